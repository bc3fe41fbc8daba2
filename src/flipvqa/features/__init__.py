"""CLIP ViT-L/14 frame features from video files (``flipvqa extract-features``).

:mod:`flipvqa.features.collect` finds the videos and their ids; :mod:`flipvqa.features.video`
decodes and selects frames exactly as the released features did; :mod:`flipvqa.features.clip`
loads CLIP and embeds frames; :mod:`flipvqa.features.extract` runs the loop and writes
``{video_id: float16 [frames, 768]}``. PyAV (``av``) and ``transformers`` are imported only when a
video is decoded or a model loaded.
"""

from flipvqa.features.clip import load_clip
from flipvqa.features.extract import add_arguments, extract_features, run
from flipvqa.features.video import output_geometry, preprocess, sample_frames, select_slots

__all__ = [
    "add_arguments",
    "extract_features",
    "load_clip",
    "output_geometry",
    "preprocess",
    "run",
    "sample_frames",
    "select_slots",
]
