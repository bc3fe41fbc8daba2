"""Finding the videos for ``flipvqa extract-features``: paths from folders, lists and globs, and ids.

:func:`collect_videos` expands what the command line names into video files; :func:`assign_ids`
gives each one the id it is stored under in the output (by a :data:`VIDEO_IDS` rule), refusing two
files with one id. Nothing here opens a video.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from flipvqa.errors import FlipVQAError

VIDEO_EXTENSIONS = frozenset(".mp4 .m4v .mkv .webm .avi .mov .mpg .mpeg .flv .wmv .3gp .ts .mts .ogv".split())
VIDEO_IDS: dict[str, Callable[[Path], str]] = {
    "stem": lambda path: path.stem,  # file name without extension (all the benchmarks' ids)
    "name": lambda path: path.name,  # file name with extension
    "path": lambda path: str(path),  # the path as listed: always unique
}


def collect_videos(specs: Sequence[str | Path]) -> list[Path]:
    """Expand folders (recursively, by video extension), ``.txt`` lists, globs and files into paths.

    A ``.txt`` list holds one path per line (blank lines and ``#`` comments ignored); relative
    entries are looked up from the current folder, then from the list's folder. Anything named
    explicitly that does not exist is an error, so a typo fails before hours of extraction.
    Duplicates (the same file reached twice) are dropped; order is kept.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            videos = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
            )
            if not videos:
                raise FlipVQAError(
                    f"{path}: folder contains no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})"
                )
            found += videos
        elif path.suffix.lower() == ".txt" and path.is_file():
            found += _read_list(path)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(str(spec)):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(spec)), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise FlipVQAError(f"{spec}: pattern matches no file")
            found += matches
        else:
            raise FlipVQAError(f"{spec}: no such file or folder")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    if not unique:
        raise FlipVQAError("no video given")
    return list(unique.values())


def _read_list(list_file: Path) -> list[Path]:
    """Read a ``.txt`` list of video paths (see :func:`collect_videos`)."""
    paths = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute() and not path.exists():
            path = list_file.parent / path
        if not path.is_file():
            raise FlipVQAError(f"{list_file}:{number}: no such video file: {entry}")
        paths.append(path)
    return paths


def assign_ids(paths: Sequence[Path], rule: str = "stem") -> dict[str, Path]:
    """Map each video id (derived by ``rule``, one of :data:`VIDEO_IDS`) to its path.

    Two files with the same id would silently overwrite each other in the output, so that is an
    error naming both.
    """
    if rule not in VIDEO_IDS:
        raise FlipVQAError(f"unknown --video_id rule {rule!r}; choose one of {', '.join(VIDEO_IDS)}")
    ids: dict[str, Path] = {}
    for path in paths:
        video_id = VIDEO_IDS[rule](path)
        if video_id in ids:
            raise FlipVQAError(
                f"{ids[video_id]} and {path} both get video id {video_id!r}; "
                "remove one or choose another --video_id rule"
            )
        ids[video_id] = path
    return ids
