"""Third-party import noise kept out of flipvqa's output.

Some packages log at import time about things that say nothing of the run: torchao (which
transformers imports on first use of a model class when it is installed) notes its optional CUDA
kernels that failed to load, a missing triton and torch's ``_pytree`` deprecations; matplotlib
notes that it is building its font cache. Those modules are imported here once with their loggers
silenced below ERROR; later imports find them loaded and say nothing. Warnings logged after the
import (by the run itself) stay visible.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "matplotlib.font_manager")


@contextmanager
def quiet_loggers(names: tuple[str, ...] = NOISY_LOGGERS) -> Iterator[None]:
    """Only errors from the loggers ``names`` (and their children) inside the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def quiet_import(name: str) -> None:
    """Import module ``name`` now, silently, when its package is installed. A module that fails to
    import is left alone: whoever needs it reports the failure in its own words."""
    if importlib.util.find_spec(name.split(".")[0]) is None:
        return
    with quiet_loggers():
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - e.g. a torchao built for another torch
            pass


def before_transformers_models() -> None:
    """Call before importing a transformers model class: transformers then imports its torchao
    integration (and torchao, when installed)."""
    if importlib.util.find_spec("torchao") is not None:
        quiet_import("transformers.quantizers.quantizer_torchao")
