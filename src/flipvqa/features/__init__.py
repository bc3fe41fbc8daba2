"""Frame features from video files (``flipvqa extract-features``): CLIP ViT-L/14 by default, or any
CLIP-family vision tower (SigLIP, SigLIP 2).

:mod:`flipvqa.features.collect` finds the videos and their ids; :mod:`flipvqa.features.video`
decodes and selects frames exactly as the released features did; :mod:`flipvqa.features.clip`
loads the encoder (:func:`load_encoder`; :func:`load_clip` for CLIP alone) and embeds frames;
:mod:`flipvqa.features.extract` runs the loop and writes ``{video_id: float16 [frames, D]}`` with
the encoder recorded in ``<output>.json``. PyAV (``av``) and ``transformers`` are imported only
when a video is decoded or a model loaded.
"""

from flipvqa.features.clip import Encoder, load_clip, load_encoder
from flipvqa.features.extract import add_arguments, extract_features, run
from flipvqa.features.video import output_geometry, preprocess, sample_frames, select_slots

__all__ = [
    "Encoder",
    "add_arguments",
    "extract_features",
    "load_clip",
    "load_encoder",
    "output_geometry",
    "preprocess",
    "run",
    "sample_frames",
    "select_slots",
]
