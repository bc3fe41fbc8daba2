"""CLIP ViT-L/14 frame features from video files (``flipvqa extract-features``).

:mod:`flipvqa.features.video` decodes and selects frames exactly as the released features did;
:mod:`flipvqa.features.extract` runs CLIP over them and writes ``{video_id: float16 [frames, 768]}``.
PyAV (``av``) and ``transformers`` are imported only when a video is decoded or a model loaded.
"""

from flipvqa.features.extract import add_arguments, extract_features, load_clip, run
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
