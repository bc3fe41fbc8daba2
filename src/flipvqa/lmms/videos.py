"""The video of an lmms-eval document as Flipped-VQA frame features.

``doc_to_visual`` gives video file paths (or ids). With ``features=``, a video whose id, path or
file stem is in that file takes those features and is not decoded. Otherwise the file is decoded
and encoded with ``clip_model`` by :meth:`flipvqa.ask.Answerer.video_features`, the frames and the
encoder of ``flipvqa ask`` and ``flipvqa extract-features``, and rounded to float16 as
``extract-features`` stores them, so that a run on the video files gives the numbers of
``flipvqa eval`` on their extracted features. A video that cannot be read (or is in neither) is
one warning naming it, and the question gets one zero frame, as the dataset readers give a video
without features.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..ask import Answerer
from ..data.records import load_features
from ..errors import FlipVQAError
from ..features.video import import_av
from ..io import first_line

log = logging.getLogger(__name__)

DocToVisual = Optional[Callable[[dict], Any]]


class Videos:
    """Frame features [frames, width] of the videos lmms-eval names, each read once per run."""

    def __init__(self, answerer: Answerer, features: Optional[str] = None):
        if features is None and answerer.clip_model is None:
            raise FlipVQAError("model_args: give clip_model= (the frame encoder, to read video files) or "
                               "features= (a features file with the videos' ids), or both")
        if features is not None and not Path(features).is_file():
            raise FlipVQAError(f"features={features}: file not found")
        self.answerer = answerer
        self.features = load_features(Path(features)) if features is not None else {}
        if self.features:
            answerer.check_features(next(iter(self.features.values())))
        self._read: dict[str, Tensor] = {}

    def of_doc(self, doc_to_visual: DocToVisual, doc: dict, where: str) -> Tensor:
        """The features of a document's video (the first one ``doc_to_visual`` names)."""
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        if isinstance(visuals, (str, os.PathLike)):
            visuals = [visuals]
        visuals = list(visuals or [])
        if not visuals:
            return self._missing(f"{where}: doc_to_visual gave no video")
        if len(visuals) > 1:  # Flipped-VQA reads one video per question
            log.warning("%s: doc_to_visual gave %d videos; flipvqa reads the first, %s", where, len(visuals),
                        visuals[0])
        video = visuals[0]
        if not isinstance(video, (str, os.PathLike)):
            raise FlipVQAError(f"{where}: doc_to_visual gave a {type(video).__name__}; flipvqa reads videos "
                               "(file paths or ids in features=)")
        return self.of(str(video))

    def of(self, video: str) -> Tensor:
        """The features of a video path or id (read once)."""
        if video not in self._read:
            self._read[video] = self._load(video)
        return self._read[video]

    def _load(self, video: str) -> Tensor:
        for key in (video, Path(video).stem):
            if key in self.features:
                return self.features[key].float()
        if self.answerer.clip_model is None:
            return self._missing(f"{video}: not in the features= file (and no clip_model= to read a file)")
        if not Path(video).is_file():
            return self._missing(f"{video}: video file not found" + (" (nor in features=)" if self.features else ""))
        try:
            features, _ = self.answerer.video_features(video)
        except (FlipVQAError, OSError, ValueError, *_av_errors()) as err:
            return self._missing(f"{video}: cannot be read ({first_line(err).removeprefix(f'{video}: ')})")
        return features.half().float()

    def _missing(self, why: str) -> Tensor:
        log.warning("%s: the question gets a zero frame", why)
        return torch.zeros(1, self.answerer.feature_dim)


def _av_errors() -> tuple[type[BaseException], ...]:
    """PyAV's own error class, as ``extract-features`` catches it (none without PyAV: the missing
    import is then the FlipVQAError being handled)."""
    try:
        return (import_av().FFmpegError,)
    except FlipVQAError:
        return ()
