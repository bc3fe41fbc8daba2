"""doc_to_visual and doc_to_choice of the local lmms-eval tasks of tests/test_lmms.py."""

import os


def video_id(doc: dict) -> list[str]:
    """A reference case's video id (flipvqa looks it up in features=)."""
    return [str(doc["video"])]


def video_file(doc: dict) -> list[str]:
    """The video file of a question, in the folder the test names (videos are generated there)."""
    return [os.path.join(os.environ.get("FLIPVQA_LMMS_VIDEOS", "videos"), f"{doc['video']}.mp4")]


def nextqa_choices(doc: dict) -> list[str]:
    """NExT-QA's five options, columns a0..a4 of its csv."""
    return [doc[f"a{k}"] for k in range(5)]
