"""The CLIP image encoder of ``flipvqa extract-features`` (and ``flipvqa ask``).

:func:`load_clip` loads the vision tower + visual projection of a Hugging Face CLIP model (a local
folder, or a hub id taken from the cache or downloaded); :func:`embed` turns uint8 frames into
float16 embeddings: the class token after the post layer norm, times the visual projection, *not*
L2-normalised, as FrozenBiLM released them. ``transformers`` is imported only when a model loads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipvqa.devices import resolve_device
from flipvqa.errors import FlipVQAError
from flipvqa.features.video import SIZE, preprocess
from flipvqa.io import first_line

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar: a full CLIP checkpoint carries a text
    tower that is expectedly unused. Missing vision weights are checked in :func:`load_clip`."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _from_pretrained(source: str, **kwargs: Any) -> tuple[torch.nn.Module, dict]:
    """Load the vision tower + projection from a full ``CLIPModel`` or a vision-only checkpoint."""
    from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(source, **kwargs)
        if isinstance(config, CLIPConfig):
            # A full CLIP config keeps the projection size at the top level; the nested vision
            # config may carry a stale default (512), which would re-initialise the projection.
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
        elif isinstance(config, CLIPVisionConfig):
            vision = config
        else:
            raise FlipVQAError(f"--clip_model {source}: a {config.model_type!r} model, not CLIP")
        return CLIPVisionModelWithProjection.from_pretrained(
            source, config=vision, output_loading_info=True, **kwargs
        )


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else was meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_clip(name_or_path: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load the vision tower + projection of a Hugging Face CLIP model, in eval mode on ``device``.

    ``name_or_path`` is a local folder (of a full ``CLIPModel`` or a ``CLIPVisionModelWithProjection``)
    or a hub id. A hub id is taken from the local cache when present; otherwise it is downloaded,
    after a quick reachability check so an offline machine fails at once instead of hanging.
    """
    if importlib.util.find_spec("transformers") is None:  # an optional dependency: say so clearly
        raise FlipVQAError(f"--clip_model {name_or_path}: needs `pip install transformers`")
    target = resolve_device(device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise FlipVQAError(f"{path}: is a file; pass the folder of a Hugging Face CLIP model")
    if path.is_dir():
        try:
            model, info = _from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise FlipVQAError(
                f"{path}: cannot load a CLIP model from this folder ({first_line(err)})"
            ) from err
    elif _looks_like_path(name):
        raise FlipVQAError(f"{path}: no such CLIP model folder")
    else:
        try:  # the hub cache first: works offline once downloaded
            model, info = _from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            model, info = _download(name)
    if info.get("missing_keys"):
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise FlipVQAError(
            f"--clip_model {name}: not a CLIP vision model with projection (missing {missing}, ...)"
        )
    if model.config.image_size != SIZE:
        raise FlipVQAError(
            f"--clip_model {name}: expects {model.config.image_size}px images, frames are {SIZE}px"
        )
    if model.config.projection_dim != 768:
        log.warning(
            "%s: embeddings have %d dimensions, not ViT-L/14's 768", name, model.config.projection_dim
        )
    # float32 weights whatever the checkpoint stores: CPU needs them; CUDA runs under fp16 autocast.
    return model.float().eval().to(target)


def _download(name: str) -> tuple[torch.nn.Module, dict]:
    """Fetch hub model ``name`` (not in the cache), failing fast with advice when offline."""
    from huggingface_hub import constants

    from flipvqa.checkpoints.hf import hub_reachable

    advice = "download it elsewhere and pass its local folder with --clip_model"
    offline_vars = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(v, "").lower() in {"1", "true", "yes", "on"} for v in offline_vars):
        raise FlipVQAError(f"--clip_model {name}: not in the local cache and the hub is offline; {advice}")
    if not hub_reachable(constants.ENDPOINT):  # a dead network fails here in seconds
        raise FlipVQAError(
            f"--clip_model {name}: not in the local cache and the Hugging Face hub "
            f"({constants.ENDPOINT}) cannot be reached; {advice}"
        )
    try:
        return _from_pretrained(name)
    except (OSError, ValueError, RuntimeError) as err:
        raise FlipVQAError(f"--clip_model {name}: download failed ({first_line(err)}); {advice}") from err


def embed(model: torch.nn.Module, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """CLIP image embeddings of uint8 frames ``[n, 224, 224, 3]`` as a float16 CPU tensor ``[n, dim]``."""
    pixels = preprocess(torch.from_numpy(frames).to(device, non_blocking=True))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        embeds = model(pixel_values=pixels).image_embeds
    return embeds.to("cpu", torch.float16)
