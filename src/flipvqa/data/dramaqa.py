"""DramaQA: ``AnotherMissOhQA_{split}_set.json``, a list of {vid, que, answers[5], correct_idx,
shot_contained}. A video id ending in ``0000`` is a scene made of the shots it contains."""

from pathlib import Path

import torch

from ..errors import FlipVQAError
from ..prompts import normalize_question
from .records import FEATURE_DIM, Record, check_answer, field_of, options_of, read_list

N_OPTIONS = 5


def scene_frames(vid: str, shots: list, features: dict):
    """Concatenate the scene's shots; a missing shot contributes one zero row, as the reference
    does (docs/faithfulness.md, "Video features")."""
    first, last = int(shots[0]), int(shots[1])
    width = next((int(v.shape[1]) for v in features.values()), FEATURE_DIM)
    parts = []
    for i in range(first, last + 1):
        key = vid[:-4] + f"{i:04}"
        parts.append(features[key].float() if key in features else torch.zeros(1, width))
    return torch.cat(parts) if parts else None


def read(root: Path, split: str, features: dict, sub: bool) -> list[Record]:
    path = root / f"AnotherMissOhQA_{split}_set.json"
    records = []
    for n, row in enumerate(read_list(path)):
        vid = str(field_of(row, "vid", path, n))
        options = options_of(row, "answers", path, n, N_OPTIONS)
        if vid.endswith("0000"):
            shots = field_of(row, "shot_contained", path, n, list)
            if len(shots) != 2:
                raise FlipVQAError(f"{path}: entry {n} has 'shot_contained' {shots!r}, expected [first, last]")
            frames = scene_frames(vid, shots, features)
        else:
            frames = features.get(vid)
        records.append(Record(
            index=n, vid=vid, qid=str(row["qid"]) if "qid" in row else None,
            question=normalize_question(field_of(row, "que", path, n)), options=options,
            answer=check_answer(field_of(row, "correct_idx", path, n, int), N_OPTIONS, path, n),
            frames=frames))
    return records
