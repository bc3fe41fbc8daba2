"""What a features file records about its encoder, ``{"encoder", "model_type", "feature_dim", "fps"}``
(written by ``flipvqa extract-features``).

A ``.pth`` holds nothing but tensors, so the record sits beside it, in ``<output>.json`` (this
module); a packed store (:mod:`flipvqa.data.store`) carries it in its own metadata. Resuming or
merging features of another encoder, width or fps is refused with :func:`check_record`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import FlipVQAError
from ..io import read_json_object, write_atomic


def record_path(output: Path) -> Path:
    """The sidecar naming the encoder of ``output``: ``clipvitl14.pth`` -> ``clipvitl14.pth.json``."""
    return output.with_name(output.name + ".json")


def read_record(output: Path) -> dict[str, Any] | None:
    """The sidecar of an existing output; None where there is none (written before sidecars were)."""
    path = record_path(output)
    if not path.exists():
        return None
    try:
        return read_json_object(path)
    except FlipVQAError as err:
        raise FlipVQAError(f"{err}; move it away with {output.name}") from err


def write_record(output: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2) + "\n"
    write_atomic(record_path(output), lambda f: f.write(text.encode("utf-8")))


def check_record(output: Path, recorded: dict[str, Any] | None, run: dict[str, Any],
                 says: Optional[str] = None) -> None:
    """Refuse to resume ``output`` when its record (in the file ``says``, by default the sidecar)
    names another encoder, width or fps than ``run``."""
    differ = [key for key, value in run.items() if recorded is not None and recorded.get(key) != value]
    if differ:
        assert recorded is not None
        was = ", ".join(f"{key} {recorded.get(key)!r}" for key in differ)
        now = ", ".join(f"{key} {run[key]!r}" for key in differ)
        raise FlipVQAError(
            f"{output}: made with {was} (says {says or record_path(output).name}), but this run has {now}; "
            "resume with the same --clip_model and --fps, or choose another --output"
        )
