"""The subtitle window and joins of --sub, on their own."""

from flipvqa.data.subtitles import in_window, tvqa_dialogue, vlep_dialogue

SRT = """1
00:00:01,900 --> 00:00:03,100
Hello
there.

2
00:00:04,000 --> 00:00:06,000
Second line.

3
01:00:09,000 --> 01:00:12,000
An hour later (hours are ignored).
"""


def test_keep_rule():
    # inside the window, or starting before it and ending inside it
    assert in_window(3, 5, 2, 6) and in_window(1, 3, 2, 6) and in_window(2, 6, 2, 6)
    assert not in_window(1, 7, 2, 6)  # covers the whole window: ends after it
    assert not in_window(5, 7, 2, 6)  # starts inside, ends after
    assert not in_window(0, 1, 2, 6)  # ends before the start


def test_tvqa_window_uses_whole_seconds(tmp_path):
    path = tmp_path / "clip.srt"
    path.write_text(SRT)
    # 00:00:01,900 counts as 1 s, 00:00:03,100 as 3 s (milliseconds dropped): kept in 1..3
    assert tvqa_dialogue(path, 1, 3) == "Dialogue:  Hello there.\n"
    assert tvqa_dialogue(path, 0, 6) == "Dialogue:  Hello there. Second line.\n"
    # the third caption reads as 9..12 s: its hour is ignored
    assert tvqa_dialogue(path, 9, 12) == "Dialogue:  An hour later (hours are ignored).\n"
    assert tvqa_dialogue(path, 20, 30) == ""  # nothing kept: no dialogue at all
    assert tvqa_dialogue(tmp_path / "missing.srt", 0, 5) is None


def test_vlep_join_drops_dashes_and_is_never_empty():
    captions = [{"start": 1.9, "end": 3.2, "text": "- Hi -"}, {"start": 4, "end": 5, "text": "you"}]
    assert vlep_dialogue(captions, 1, 5) == "Dialogue:  Hi you\n"  # int() of the times, no separator
    assert vlep_dialogue(captions, 10, 20) == "Dialogue: \n"
