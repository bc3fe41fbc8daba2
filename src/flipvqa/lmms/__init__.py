"""flipvqa as an lmms-eval model: ``lmms-eval --model flipvqa --model_args checkpoint=...``.

lmms-eval finds the model through the ``lmms_eval.models`` entry point, which names
:func:`manifest`; the model class is :class:`flipvqa.lmms.model.FlipVQA`. Multiple-choice tasks get
each option's mean cross-entropy (lmms-eval takes the lowest, as Flipped-VQA does), generation
tasks the answer in words. :mod:`flipvqa.lmms.requests` turns lmms-eval's requests into
questions and :mod:`flipvqa.lmms.videos` their videos into frame features; neither imports
lmms-eval, which only ``pip install -e ".[lmms]"`` installs.
"""

from __future__ import annotations

MODEL_ID = "flipvqa"
CLASS_PATH = "flipvqa.lmms.model.FlipVQA"


def manifest():
    """The entry point's payload (a callable, so that importing flipvqa never needs lmms-eval)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
