"""Run options: every default defined once, in :class:`RunConfig`; the parser is built from it.

Flag names are the authors' (``train.py`` of mlvlab/Flipped-VQA), so their commands work with
``train.py`` replaced by ``flipvqa train``. ``--preset`` fills in one of the paper's five runs;
flags given explicitly override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import FlipVQAError


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    # model
    model: str = _opt("7B", "backbone folder under --llama_model_path (or a path / Hugging Face folder or hub id)")
    llama_model_path: str = _opt("./pretrained/llama/", "folder holding the backbone folder and tokenizer.model")
    tokenizer_path: Optional[str] = _opt(None, "tokenizer file (default: the backbone folder's own, "
                                               "else <llama_model_path>/tokenizer.model)")
    adapter_len: int = _opt(10, "adaption prompt rows per adapted layer")
    adapter_layer: Optional[int] = _opt(None, "adapt the last N layers (default: all layers)")
    skip_unadapted_layers: bool = _opt(False, "run only the adapted layers, as the reference does "
                                              "(needed for checkpoints trained with adapter_layer < n_layers)")
    max_seq_len: int = _opt(512, "maximum tokens per sequence (longer ones are truncated as the reference does)")
    max_feats: int = _opt(10, "video frame slots")
    bias: float = _opt(3.0, "initial video attention bias (gate2 starts at -bias)")
    tau: float = _opt(100.0, "temperature of the QAV frame classification")
    vaq: bool = _opt(False, "add the VAQ (predict the question) objective")
    qav: bool = _opt(False, "add the QAV (predict the video) objective")
    sub: bool = _opt(False, "add subtitles (VLEP, TVQA)")
    # data
    dataset: str = _opt("nextqa", "nextqa | star | dramaqa | vlep | tvqa")
    data_path: str = _opt("./data", "folder holding <dataset>/ folders in the released layout")
    split: str = _opt("val", "split to evaluate (eval)")
    # optimisation
    batch_size: int = _opt(64, "questions per batch and process")
    epochs: int = _opt(400, "training epochs")
    accum_iter: int = _opt(1, "gradient accumulation steps")
    warmup_epochs: int = _opt(40, "linear warm-up epochs")
    blr: float = _opt(1e-3, "base learning rate: lr = blr * batch_size * accum_iter * world_size / 256")
    lr: Optional[float] = _opt(None, "absolute learning rate (overrides --blr)")
    min_lr: float = _opt(0.0, "lower bound of the cosine schedule")
    weight_decay: float = _opt(0.05, "AdamW weight decay (tensors with ndim > 1)")
    # run
    output_dir: str = _opt("./output_dir", "where checkpoints, log.txt and predictions go")
    resume: str = _opt("", "checkpoint to load (the authors' or ours); continues training when it has optimizer state")
    seed: int = _opt(0, "random seed")
    num_workers: int = _opt(2, "data loader workers")
    device: Optional[str] = _opt(None, "cuda | cpu | cuda:N (default: cuda if available)")
    dtype: Optional[str] = _opt(None, "frozen backbone dtype: bf16 | fp16 | fp32 (default: the checkpoint's on GPU, fp32 on CPU)")
    grad_checkpointing: bool = _opt(False, "recompute layer activations in the backward pass (less memory, ~30% slower)")
    compile: bool = _opt(False, "torch.compile the backbone's layers (GPU; first steps are slow while it compiles)")
    preset: Optional[str] = _opt(None, "fill in one of the paper's runs: nextqa | star | dramaqa | vlep | tvqa")


# The paper's five runs (SPEC.md section 9; LLaMA 7B on 4 GPUs, TVQA on 8).
PRESETS: dict[str, dict] = {
    "nextqa": dict(dataset="nextqa", max_seq_len=128, batch_size=8, accum_iter=2, epochs=5, warmup_epochs=2,
                   blr=9e-2, weight_decay=0.14, bias=3.5, tau=100.0, max_feats=10, vaq=True, qav=True),
    "star": dict(dataset="star", max_seq_len=128, batch_size=8, accum_iter=1, epochs=5, warmup_epochs=2,
                 blr=9e-2, weight_decay=0.16, bias=3.0, tau=100.0, max_feats=10, vaq=True, qav=True),
    "dramaqa": dict(dataset="dramaqa", max_seq_len=384, batch_size=2, accum_iter=8, epochs=5, warmup_epochs=2,
                    blr=9e-2, weight_decay=0.10, bias=3.0, tau=100.0, max_feats=10, vaq=True, qav=True),
    "vlep": dict(dataset="vlep", max_seq_len=256, batch_size=4, accum_iter=8, epochs=5, warmup_epochs=2,
                 blr=6e-2, weight_decay=0.20, bias=3.0, tau=100.0, max_feats=10, sub=True, qav=True),
    "tvqa": dict(dataset="tvqa", max_seq_len=650, batch_size=1, accum_iter=4, epochs=5, warmup_epochs=2,
                 blr=7e-2, weight_decay=0.02, bias=3.0, tau=100.0, max_feats=10, sub=True, vaq=True, qav=True),
}
PRESET_GPUS = {"nextqa": 4, "star": 4, "dramaqa": 4, "vlep": 4, "tvqa": 8}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every :class:`RunConfig` field as ``--name``; defaults are left unset (None) here so
    that :func:`resolve` can tell an explicit flag from a preset value."""
    for f in dataclasses.fields(RunConfig):
        flag, help_text = f"--{f.name}", f.metadata["help"]
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
        extra = {"choices": sorted(PRESETS)} if f.name == "preset" else {}
        parser.add_argument(flag, type=kind, default=None, help=f"{help_text} (default: {f.default})", **extra)
    # Accepted for compatibility with the authors' commands; torchrun sets the real values.
    for flag in ("--local_rank", "--world_size", "--start_epoch"):
        parser.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dist_url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pin_mem", action="store_true", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no_pin_mem", action="store_true", default=None, help=argparse.SUPPRESS)


def resolve(ns: argparse.Namespace) -> argparse.Namespace:
    """Defaults < preset < explicit flags. Returns a plain Namespace with every RunConfig field
    (the type the authors' checkpoints store under ``args``)."""
    values = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    preset = getattr(ns, "preset", None)
    if preset:
        values.update(PRESETS[preset])
    for name in values:
        given = getattr(ns, name, None)
        if given is not None:
            values[name] = given
    if values["tokenizer_path"] is None:
        values["tokenizer_path"] = default_tokenizer_path(values["llama_model_path"], values["model"])
    for name in ("batch_size", "epochs", "accum_iter", "max_seq_len", "max_feats", "adapter_len"):
        if values[name] < 1:
            raise FlipVQAError(f"--{name} must be at least 1 (got {values[name]})")
    if values["warmup_epochs"] < 0:
        raise FlipVQAError(f"--warmup_epochs must be >= 0 (got {values['warmup_epochs']})")
    return argparse.Namespace(**values)


def backbone_folder(args: argparse.Namespace) -> Path:
    """``--model`` names a folder under ``--llama_model_path``, or is itself a path, or a
    Hugging Face hub id (``owner/name``, fetched when online)."""
    under = Path(args.llama_model_path) / args.model
    if under.is_dir():
        return under
    direct = Path(args.model)
    if direct.is_dir():
        return direct
    if args.model.count("/") == 1 and not args.model.startswith((".", "/")):
        from .checkpoints.hf import resolve_backbone

        return resolve_backbone(args.model)
    return under  # reported as missing by the loader


def default_tokenizer_path(llama_model_path: str, model: str) -> str:
    """The backbone folder's own tokenizer (Hugging Face folders have one), else Meta's shared
    ``<llama_model_path>/tokenizer.model``."""
    for folder in (Path(llama_model_path) / model, Path(model)):
        for name in ("tokenizer.model", "tokenizer.json"):
            if (folder / name).is_file():
                return str(folder / name)
    return str(Path(llama_model_path) / "tokenizer.model")
