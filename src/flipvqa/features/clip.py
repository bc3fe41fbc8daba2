"""The frame encoders of ``flipvqa extract-features`` (and the CLIP of ``flipvqa ask``).

:func:`load_encoder` loads any CLIP-family vision tower from a Hugging Face folder or hub id (a local
folder, or a hub id taken from the cache or downloaded) as an :class:`Encoder`:

* ``clip`` / ``clip_vision_model``: the vision tower + visual projection, on FrozenBiLM's 224x224
  centre crops normalised with CLIP's mean/std (:mod:`flipvqa.features.video`); the embedding is the
  class token after the post layer norm, times the projection, *not* L2-normalised, as FrozenBiLM
  released them. :func:`load_clip` and :func:`embed` are this path on its own (``flipvqa ask``).
* ``siglip`` / ``siglip_vision_model`` (and ``siglip2`` / ``siglip2_vision_model``): whole frames
  through the model's own image processor (SigLIP's defaults when the folder has none), then the
  pooled output (the attention-pooling head) of ``SiglipVisionModel``.

``transformers`` is imported only when a model loads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from flipvqa.devices import resolve_device
from flipvqa.errors import FlipVQAError
from flipvqa.features.video import SIZE, preprocess
from flipvqa.io import first_line
from flipvqa.quiet import before_transformers_models

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
CLIP_TYPES = ("clip", "clip_vision_model")
# model_type -> the transformers class of its vision tower (siglip2 only where transformers has it)
PROCESSOR_TYPES = {kind: "SiglipVisionModel" for kind in ("siglip", "siglip_vision_model")}
PROCESSOR_TYPES |= {kind: "Siglip2VisionModel" for kind in ("siglip2", "siglip2_vision_model")}

Pixels = dict[str, torch.Tensor]  # an encoder's model inputs for n frames, each tensor [n, ...]
T = TypeVar("T")

@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar: a full CLIP (or SigLIP) checkpoint
    carries a text tower that is expectedly unused. Missing vision weights are checked after loading."""
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


# --------------------------------------------------------------------------- encoders


@contextmanager
def _inference(device: torch.device) -> Iterator[None]:
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        yield


class Encoder:
    """A frame encoder: the frame geometry it takes, how frames become its inputs, and the embedding.

    ``crop`` is the geometry it asks :func:`flipvqa.features.video.iter_frames` for; the frame
    *selection* is the same for every encoder. CLIP takes FrozenBiLM's 224x224 centre crops: the
    released features were made from them and the tower expects 224 px, so they stay small uint8
    arrays until the device normalises them. An encoder with its own image processor takes whole
    decoded frames instead: SigLIP resizes the full frame to its own square (e.g. 384 px), which a
    224 crop would first cut down and then upsample.

    :meth:`prepare` runs on the CPU in the decoding threads, one chunk of frames at a time, so the
    processors' resizing runs in parallel and full-size frames are never held for a whole video;
    :meth:`embed` runs a batch of prepared frames (from any number of videos) through the model.
    """

    crop = True

    def __init__(self, model: torch.nn.Module, source: str, model_type: str, feature_dim: int) -> None:
        self.model, self.source, self.model_type, self.feature_dim = model, source, model_type, feature_dim

    def record(self) -> dict[str, Any]:
        """What the output's sidecar says about the encoder."""
        return {"encoder": self.source, "model_type": self.model_type, "feature_dim": self.feature_dim}

    def prepare(self, frames: np.ndarray) -> Pixels:
        """Model inputs (CPU tensors, ``[n, ...]`` each) for uint8 frames ``[n, H, W, 3]``."""
        raise NotImplementedError

    def embed(self, pixels: Pixels, device: torch.device) -> torch.Tensor:
        """Embeddings of prepared frames as a float16 CPU tensor ``[n, feature_dim]``."""
        raise NotImplementedError


class ClipEncoder(Encoder):
    """CLIP on 224x224 crops, exactly as :func:`embed` (the released features)."""

    def __init__(self, model: torch.nn.Module, source: str, model_type: str = "clip") -> None:
        super().__init__(model, source, model_type, int(model.config.projection_dim))

    def prepare(self, frames: np.ndarray) -> Pixels:
        return {"frames": torch.from_numpy(frames)}  # normalised on the device, by embed()

    def embed(self, pixels: Pixels, device: torch.device) -> torch.Tensor:
        return _embed_clip(self.model, pixels["frames"], device)


class ProcessorEncoder(Encoder):
    """SigLIP / SigLIP 2: the model's image processor on whole frames, then the pooled output."""

    crop = False

    def __init__(self, model: torch.nn.Module, source: str, model_type: str, processor: Any) -> None:
        super().__init__(model, source, model_type, int(model.config.hidden_size))
        self.processor = processor

    def prepare(self, frames: np.ndarray) -> Pixels:
        batch = self.processor(images=list(frames), return_tensors="pt", input_data_format="channels_last")
        return dict(batch.items())  # pixel_values (SigLIP 2 adds pixel_attention_mask, spatial_shapes)

    def embed(self, pixels: Pixels, device: torch.device) -> torch.Tensor:
        inputs = {key: value.to(device, non_blocking=True) for key, value in pixels.items()}
        with _inference(device):
            embeds = self.model(**inputs).pooler_output
        return embeds.to("cpu", torch.float16)

    def check(self, device: torch.device) -> None:
        """Embed one blank frame, so a processor that does not fit the model fails now, in one line."""
        try:
            out = self.embed(self.prepare(np.zeros((1, 64, 64, 3), np.uint8)), device)
        except (RuntimeError, ValueError, TypeError) as err:
            raise FlipVQAError(
                f"--clip_model {self.source}: its image processor does not fit the model ({first_line(err)})"
            ) from err
        self.feature_dim = int(out.shape[-1])


def _embed_clip(model: torch.nn.Module, frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    pixels = preprocess(frames.to(device, non_blocking=True))
    with _inference(device):
        embeds = model(pixel_values=pixels).image_embeds
    return embeds.to("cpu", torch.float16)


def embed(model: torch.nn.Module, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """CLIP image embeddings of uint8 frames ``[n, 224, 224, 3]`` as a float16 CPU tensor ``[n, dim]``
    (``model`` from :func:`load_clip`)."""
    return _embed_clip(model, torch.as_tensor(frames), device)


def encoder_name(model: str | Path | torch.nn.Module | Encoder) -> str:
    """How the sidecar names an encoder: a local folder by its absolute path, a hub id as given."""
    if isinstance(model, Encoder):
        return model.source
    if isinstance(model, torch.nn.Module):
        model = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.is_dir() else str(model)


def count_pixels(pixels: Pixels) -> int:
    return len(next(iter(pixels.values())))


def slice_pixels(pixels: Pixels, start: int, stop: int | None = None) -> Pixels:
    return {key: value[start:stop] for key, value in pixels.items()}


def cat_pixels(parts: Sequence[Pixels]) -> Pixels:
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def as_encoder(model: str | Path | torch.nn.Module | Encoder, device: torch.device) -> Encoder:
    """``model`` as an :class:`Encoder` on ``device``: loaded from a name; an Encoder, or a CLIP model
    from :func:`load_clip`, is used as it is."""
    if isinstance(model, Encoder):
        model.model.to(device).eval()
        return model
    if isinstance(model, torch.nn.Module):
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind not in CLIP_TYPES:
            raise FlipVQAError(f"a {kind or type(model).__name__} model object: for anything but CLIP "
                               "pass a folder, a hub id or an Encoder from load_encoder()")
        return ClipEncoder(model.to(device).eval(), encoder_name(model), kind)
    return load_encoder(model, device)


# --------------------------------------------------------------------------- loading


def supported_types() -> list[str]:
    """The model types :func:`load_encoder` takes (SigLIP 2 where transformers has it)."""
    import transformers

    return [*CLIP_TYPES, *(kind for kind, cls in PROCESSOR_TYPES.items() if hasattr(transformers, cls))]


def _clip_from_config(source: str, config: Any, **kwargs: Any) -> tuple[torch.nn.Module, dict]:
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

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


def _from_pretrained(source: str, **kwargs: Any) -> tuple[torch.nn.Module, dict]:
    """Load the vision tower + projection from a full ``CLIPModel`` or a vision-only checkpoint."""
    from transformers import AutoConfig

    with _quiet_transformers():
        return _clip_from_config(source, AutoConfig.from_pretrained(source, **kwargs), **kwargs)


def _any_from_pretrained(source: str, **kwargs: Any) -> tuple[str, torch.nn.Module, dict, Any]:
    """Load any supported vision tower: ``(model_type, model, loading info, image processor)``,
    the processor None for CLIP (which keeps the released preprocessing)."""
    import transformers

    with _quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(source, **kwargs)
        kind = config.model_type
        if kind in CLIP_TYPES:
            return kind, *_clip_from_config(source, config, **kwargs), None
        if kind not in supported_types():
            raise FlipVQAError(
                f"{source}: a {kind!r} model, not a vision tower extract-features knows "
                f"(--clip_model takes model types {', '.join(supported_types())})"
            )
        vision = getattr(config, "vision_config", config)  # a full SigLIP model holds a text tower too
        model, info = getattr(transformers, PROCESSOR_TYPES[kind]).from_pretrained(
            source, config=vision, output_loading_info=True, **kwargs
        )
        return kind, model, info, _image_processor(source, vision, **kwargs)


def _image_processor(source: str, vision: Any, **kwargs: Any) -> Any:
    """The checkpoint's own image processor; SigLIP's defaults where it has no processor config."""
    import transformers
    from transformers.image_utils import PILImageResampling

    try:
        return transformers.AutoImageProcessor.from_pretrained(source, **kwargs)
    except OSError:
        pass
    if vision.model_type.startswith("siglip2"):
        defaults: dict[str, Any] = {"patch_size": vision.patch_size, "max_num_patches": vision.num_patches}
        processor = transformers.Siglip2ImageProcessor(**defaults)
    else:
        size = vision.image_size
        defaults = {
            "size": {"height": size, "width": size},  # a square: SigLIP squashes, it does not crop
            "resample": PILImageResampling.BICUBIC,
            "rescale_factor": 1 / 255,
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
        }
        processor = transformers.SiglipImageProcessor(
            do_resize=True, do_rescale=True, do_normalize=True, **defaults
        )
    log.warning("%s: no image processor config, using SigLIP's defaults %s", source, defaults)
    return processor


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else was meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _resolve(name_or_path: str | Path, load: Callable[..., T], what: str) -> T:
    """``load(source, **kwargs)`` from a local folder, else from the hub cache, else downloaded
    (after a quick reachability check, so an offline machine fails at once instead of hanging)."""
    if importlib.util.find_spec("transformers") is None:  # an optional dependency: say so clearly
        raise FlipVQAError(f"--clip_model {name_or_path}: needs `pip install transformers`")
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise FlipVQAError(f"{path}: is a file; pass the folder of a Hugging Face {what}")
    if path.is_dir():
        try:
            return load(str(path), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise FlipVQAError(f"{path}: cannot load a {what} from this folder ({first_line(err)})") from err
    if _looks_like_path(name):
        raise FlipVQAError(f"{path}: no such {what} folder")
    try:  # the hub cache first: works offline once downloaded
        return load(name, local_files_only=True)
    except (OSError, ValueError):
        return _download(name, load)


def _download(name: str, load: Callable[..., T]) -> T:
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
        return load(name)
    except (OSError, ValueError, RuntimeError) as err:
        raise FlipVQAError(f"--clip_model {name}: download failed ({first_line(err)}); {advice}") from err


def _checked_clip(model: torch.nn.Module, info: dict, name: str, target: torch.device) -> torch.nn.Module:
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


def load_clip(name_or_path: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load the vision tower + projection of a Hugging Face CLIP model, in eval mode on ``device``.

    ``name_or_path`` is a local folder (of a full ``CLIPModel`` or a ``CLIPVisionModelWithProjection``)
    or a hub id. A hub id is taken from the local cache when present; otherwise it is downloaded,
    after a quick reachability check so an offline machine fails at once instead of hanging.
    """
    target = resolve_device(device)
    model, info = _resolve(name_or_path, _from_pretrained, "CLIP model")
    return _checked_clip(model, info, str(name_or_path), target)


def load_encoder(name_or_path: str | Path, device: str | torch.device | None = None) -> Encoder:
    """Load a CLIP-family vision tower (see the module docstring) as an :class:`Encoder` on ``device``.

    Found as :func:`load_clip` finds CLIP. CLIP gives exactly :func:`load_clip`'s model; a model
    type it does not know is one line naming the folder, the type and the supported ones.
    """
    before_transformers_models()
    target = resolve_device(device)
    name = str(name_or_path)
    kind, model, info, processor = _resolve(name, _any_from_pretrained, "CLIP-family model")
    if processor is None:
        return ClipEncoder(_checked_clip(model, info, name, target), encoder_name(name), kind)
    if info.get("missing_keys"):
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise FlipVQAError(f"--clip_model {name}: not a complete {kind} vision tower (missing {missing})")
    if getattr(model.config, "vision_use_head", True) is False:
        raise FlipVQAError(f"--clip_model {name}: no pooling head (vision_use_head false), no pooled output")
    encoder = ProcessorEncoder(model.float().eval().to(target), encoder_name(name), kind, processor)
    encoder.check(target)
    return encoder
