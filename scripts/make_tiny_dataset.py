"""Make a tiny video-QA dataset from scratch, for the README's worked example of the generic format.

    python scripts/make_tiny_dataset.py tiny/

writes ``tiny/videos/*.mp4`` (a few seconds each: a coloured square moving left or right, or
staying still), ``tiny/clip/`` (a tiny *random* CLIP vision model: the pipeline runs offline, the
features mean nothing) and ``tiny/data/tiny/{train,val}.jsonl`` (questions with 2 or 3 options,
some with a time window). Then ``flipvqa extract-features`` turns the videos into
``tiny/data/tiny/features.pth`` and ``flipvqa train --dataset tiny --data_path tiny/data`` trains
on it. Needs ``pip install -e ".[video]"``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220)}
MOTIONS = ("moves to the left", "moves to the right", "stays still")


def write_video(path: Path, colour: tuple[int, int, int], motion: str, seconds: int, rate: int = 10) -> None:
    import av

    size = 64
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * rate):
            frame = np.full((size, size, 3), 255, np.uint8)
            step = i * (size - 16) // (seconds * rate)
            x = {"moves to the left": size - 16 - step, "moves to the right": step}.get(motion, (size - 16) // 2)
            frame[24:40, x:x + 16] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_clip(folder: Path) -> None:
    """A tiny random CLIP vision tower with a 32-d projection: features of width 32."""
    import torch
    import transformers

    from flipvqa.quiet import before_transformers_models

    before_transformers_models()  # keep torchao's import notes out of the output
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=224, patch_size=32, projection_dim=32)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(folder)


def questions(rng: random.Random, vid: str, colour: str, motion: str, seconds: int) -> list[dict]:
    others = [m for m in MOTIONS if m != motion]
    options = [motion, *rng.sample(others, rng.randint(1, 2))]
    rng.shuffle(options)
    colours = list(COLOURS)
    rng.shuffle(colours)
    rows = [{"video": vid, "question": "what does the square do", "options": options, "answer": motion,
             "type": "motion"},
            {"video": vid, "question": "what colour is the square", "options": colours,
             "answer": colours.index(colour), "type": "colour", "start": 0, "end": seconds // 2}]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    (args.out / "videos").mkdir(parents=True, exist_ok=True)
    data = args.out / "data" / "tiny"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(args.videos):
        colour, motion, seconds = rng.choice(list(COLOURS)), rng.choice(MOTIONS), rng.randint(3, 6)
        vid = f"clip{i:03d}"
        write_video(args.out / "videos" / f"{vid}.mp4", COLOURS[colour], motion, seconds)
        rows += questions(rng, vid, colour, motion, seconds)
    cut = len(rows) * 3 // 4
    for split, part in (("train", rows[:cut]), ("val", rows[cut:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    write_clip(args.out / "clip")
    print(f"{args.videos} videos in {args.out / 'videos'}, {cut} train / {len(rows) - cut} val questions in {data}, "
          f"a tiny random CLIP in {args.out / 'clip'}")


if __name__ == "__main__":
    main()
