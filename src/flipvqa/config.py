"""Run options: every default defined once, in :class:`RunConfig`; the parser is built from it.

Flag names are the authors' (``train.py`` of mlvlab/Flipped-VQA), so their commands work with
``train.py`` replaced by ``flipvqa train``. ``--preset`` fills in one of the paper's five runs;
flags given explicitly override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .errors import FlipVQAError


# Which commands take a flag. Each command's parser gets exactly the flags it uses, so a flag a
# command would ignore is an error there ("unrecognized arguments"), never silence.
MODEL = ("train", "eval", "bench", "ask")  # what shapes the model and its prompts
RUNS = ("train", "eval", "bench")  # dataset runs
CHECK = ("check",)  # flipvqa data check: the data and the tokenizer, never the backbone


def _opt(default, help: str, used_by: tuple[str, ...] = RUNS, helps: Optional[dict[str, str]] = None, **kw):
    """A run option: its default, its help (``helps``: another wording for some commands) and the
    commands that take it."""
    return field(default=default, metadata={"help": help, "used_by": used_by, "helps": helps or {}, **kw})


@dataclass
class RunConfig:
    # model
    model: str = _opt("7B", "backbone folder under --llama_model_path (or a path / Hugging Face folder or hub id)",
                      MODEL + CHECK)
    llama_model_path: str = _opt("./pretrained/llama/", "folder holding the backbone folder and tokenizer.model",
                                 MODEL + CHECK)
    tokenizer_path: Optional[str] = _opt(None, "tokenizer file (default: the backbone folder's own, "
                                               "else <llama_model_path>/tokenizer.model)", MODEL + CHECK)
    adapter_len: int = _opt(10, "adaption prompt rows per adapted layer", MODEL)
    adapter_layer: Optional[int] = _opt(None, "adapt the last N layers (default: all layers)", MODEL)
    skip_unadapted_layers: bool = _opt(False, "run only the adapted layers, as the reference does "
                                              "(needed for checkpoints trained with adapter_layer < n_layers)", MODEL)
    max_seq_len: int = _opt(512, "maximum tokens per sequence (longer ones are truncated as the reference does)",
                            MODEL + CHECK)
    max_feats: int = _opt(10, "video frame slots", MODEL + CHECK)
    bias: float = _opt(3.0, "initial video attention bias (gate2 starts at -bias)", MODEL)
    tau: float = _opt(100.0, "temperature of the QAV frame classification", MODEL)
    vaq: bool = _opt(False, "add the VAQ (predict the question) objective", ("train", "bench", "check"))
    qav: bool = _opt(False, "add the QAV (predict the video) objective", ("train", "bench", "check"))
    sub: bool = _opt(False, "add subtitles (VLEP, TVQA)", MODEL + CHECK)
    # data
    dataset: str = _opt("nextqa", "nextqa | star | dramaqa | vlep | tvqa, or a folder in the generic format",
                        RUNS + CHECK)
    data_path: str = _opt("./data", "folder holding <dataset>/ folders", RUNS + CHECK)
    split: str = _opt("val", "split to evaluate", ("eval", "bench"))
    # optimisation
    batch_size: int = _opt(64, "questions per batch and process")
    epochs: int = _opt(400, "training epochs", ("train",))
    accum_iter: int = _opt(1, "gradient accumulation steps", ("train",))
    warmup_epochs: int = _opt(40, "linear warm-up epochs", ("train",))
    blr: float = _opt(1e-3, "base learning rate: lr = blr * batch_size * accum_iter * world_size / 256",
                      ("train", "bench"))
    lr: Optional[float] = _opt(None, "absolute learning rate (default: from --blr)", ("train", "bench"))
    min_lr: float = _opt(0.0, "lower bound of the cosine schedule", ("train",))
    weight_decay: float = _opt(0.05, "AdamW weight decay (tensors with ndim > 1)", ("train", "bench"))
    # run
    output_dir: str = _opt("./output_dir", "where checkpoints, log.txt and predictions go", ("train", "eval"))
    resume: str = _opt("", "checkpoint to start from (the authors' or ours); training continues from it when it "
                           "has optimizer state; --resume auto continues <output_dir>/checkpoint_last.pth "
                           "when there is one", ("train", "eval", "ask"),
                       helps={"eval": "the checkpoint to evaluate (the authors' or ours); the model options it "
                                      "was trained with are used unless given",
                              "ask": "the checkpoint to answer with (the authors' or ours); the model options "
                                     "it was trained with are used unless given",
                              "serve": "the checkpoint to serve (the authors' or ours; default: the bundled demo "
                                       "model)"})
    save_every: int = _opt(500, "also save checkpoint_last.pth every N optimizer steps (0: at epoch ends only)",
                           ("train",))
    overwrite: bool = _opt(False, "start over in an --output_dir that holds an earlier run (removes its files)",
                           ("train", "eval"),
                           helps={"eval": "replace predictions_<split>.jsonl when --output_dir already holds one "
                                          "(a finished run's, or an earlier evaluation's)"})
    untrained: bool = _opt(False, "evaluate without --resume: freshly initialised Flipped-VQA weights on the "
                                  "frozen backbone (zero gates: a baseline, not a trained model)", ("eval",))
    skip_nonfinite: int = _opt(0, "skip up to N batches whose loss is not finite (default: stop at the first)",
                               ("train",))
    tensorboard: bool = _opt(False, "also write TensorBoard event files under <output_dir>/tensorboard", ("train",))
    seed: int = _opt(0, "random seed (and of sampled answers)", RUNS + ("ask",))
    num_workers: int = _opt(2, "data loader workers", ("train", "eval"))
    device: Optional[str] = _opt(None, "cuda | cpu | cuda:N (default: cuda if available)", MODEL)
    dtype: Optional[str] = _opt(None, "frozen backbone dtype: bf16 | fp16 | fp32 (default: the checkpoint's on "
                                      "GPU, fp32 on CPU)", MODEL)
    grad_checkpointing: bool = _opt(False, "recompute layer activations in the backward pass (less memory, "
                                           "about 30% slower)", ("train", "bench"))
    fsdp: bool = _opt(False, "under torchrun: shard the frozen backbone over the processes (FSDP2, one unit per "
                             "transformer block); checkpoints still hold the trainable weights only",
                      ("train", "eval"))
    quantize: Optional[str] = _opt(None, "store the frozen backbone's block linears quantized: int8 (weight-only; "
                                         "CPU and GPU) | nf4 (GPU); needs pip install 'flipvqa[quant]'", MODEL)
    # open-ended questions (answers in words)
    max_new_tokens: int = _opt(32, "most tokens generated for an open-ended answer",
                               ("train", "eval", "ask", "bench"))
    temperature: float = _opt(0.0, "sample open-ended answers at this temperature (0: greedy, the arg-max)",
                              ("eval", "ask"))
    top_p: float = _opt(1.0, "with --temperature: sample from the smallest set of tokens whose probability "
                             "reaches this", ("eval", "ask"))
    compile: bool = _opt(False, "torch.compile the backbone's layers (GPU; first steps are slow while it compiles)")
    preset: Optional[str] = _opt(None, "fill in one of the paper's runs: nextqa | star | dramaqa | vlep | tvqa")


# The options that shape a trained model and its prompts: `eval` and `ask` take them from a
# checkpoint's stored args unless they are given (an explicit flag wins).
MODEL_OPTIONS = ("model", "llama_model_path", "tokenizer_path", "adapter_len", "adapter_layer",
                 "skip_unadapted_layers", "max_seq_len", "max_feats", "bias", "tau", "sub")

# --quantize: how the frozen block linears may be stored (flipvqa.quantize.MODES).
QUANTIZE_CHOICES = ("int8", "nf4")

# --dtype: the usual spellings of each canonical name.
DTYPE_SPELLINGS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                   "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def parse_dtype(name: str) -> str:
    """The canonical name (bf16 | fp16 | fp32) of a --dtype spelling."""
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_SPELLINGS:
        raise FlipVQAError(f"--dtype {name}: not a dtype; choose bf16 (bfloat16), fp16 (float16, half) "
                           f"or fp32 (float32)")
    return DTYPE_SPELLINGS[key]


# The paper's five runs (docs/faithfulness.md, "Presets"; LLaMA 7B on 4 GPUs, TVQA on 8).
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


# The accuracy (%) the paper reports for each preset's run (LLaMA 7B; its Table 1).
PAPER_ACCURACY = {"nextqa": 72.0, "star": 65.4, "dramaqa": 84.1, "vlep": 71.0, "tvqa": 82.2}


_FIELD_TYPES = {f.name: str(f.type).replace("Optional[", "").rstrip("]") for f in dataclasses.fields(RunConfig)}
# Training options that evaluation accepts and ignores (the authors' evaluation commands pass them).
TRAINING_ONLY = ("epochs", "accum_iter", "warmup_epochs", "blr", "lr", "min_lr", "weight_decay", "vaq", "qav",
                 "grad_checkpointing")


def ignored_training_flags(ns: argparse.Namespace) -> list[str]:
    """The training-only flags given to ``flipvqa eval``."""
    return [f"--{name}" for name in TRAINING_ONLY if getattr(ns, name, None) is not None]


def _default_note(f: dataclasses.Field, shown_as: str) -> str:
    """How a flag's help states its default: where a checkpoint supplies the value, that first."""
    if f.default in (None, "") or "(default:" in f.metadata["help"]:
        return ""
    if f.name in MODEL_OPTIONS and shown_as == "serve":
        return " (default: the --resume checkpoint's; without --resume, the demo model's)"
    if f.name in MODEL_OPTIONS and shown_as in ("eval", "ask"):
        return f" (default: the --resume checkpoint's, else {f.default})"
    return f" (default: {f.default})"


def add_run_arguments(parser: argparse.ArgumentParser, command: str, shown_as: Optional[str] = None) -> None:
    """Add the :class:`RunConfig` fields that ``command`` uses as ``--name`` (their help worded for
    ``shown_as``, default ``command``: serve takes ask's flags). Defaults are left unset (None)
    here so that :func:`resolve` can tell an explicit flag from a preset value."""
    shown_as = shown_as or command
    for f in dataclasses.fields(RunConfig):
        if command not in f.metadata["used_by"]:
            continue
        help_text = f.metadata["helps"].get(shown_as, f.metadata["help"])
        flag, help_text = f"--{f.name}", help_text.replace("%", "%%")  # argparse formats help with %
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        help_text += _default_note(f, shown_as)
        kind = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
        extra = {"choices": sorted(PRESETS), "metavar": "NAME"} if f.name == "preset" else {}
        parser.add_argument(flag, type=kind, default=None, help=help_text, **extra)
    if command in ("train", "eval"):
        # Accepted for compatibility with the authors' commands (torch.distributed.launch passes
        # --local_rank); torchrun's environment sets the real values.
        for name in ("--local_rank", "--world_size", "--start_epoch"):
            parser.add_argument(name, type=int, default=None, help=argparse.SUPPRESS)
        parser.add_argument("--dist_url", default=None, help=argparse.SUPPRESS)
        parser.add_argument("--pin_mem", action="store_true", default=None, help=argparse.SUPPRESS)
        parser.add_argument("--no_pin_mem", action="store_true", default=None, help=argparse.SUPPRESS)
    if command == "eval":
        # The authors evaluate with their training command, eval.py for train.py, plus --resume:
        # its training options are accepted (not listed) so that command works, and
        # flipvqa eval says that it ignores them (see TRAINING_ONLY).
        for name in TRAINING_ONLY:
            kind = {"bool": None, "int": int, "float": float}[_FIELD_TYPES[name]]
            if kind is None:
                parser.add_argument(f"--{name}", action="store_true", default=None, help=argparse.SUPPRESS)
            else:
                parser.add_argument(f"--{name}", type=kind, default=None, help=argparse.SUPPRESS)


def with_stored_options(ns: argparse.Namespace, stored: dict) -> argparse.Namespace:
    """``ns`` with each of :data:`MODEL_OPTIONS` it leaves unset taken from a checkpoint's
    stored args. A backbone given explicitly re-derives the tokenizer unless that is given too."""
    out = argparse.Namespace(**vars(ns))
    if stored and "skip_unadapted_layers" not in stored and getattr(ns, "skip_unadapted_layers", None) is None:
        # Saved by the authors' code, which runs only the adapted layers (the same as running all
        # of them when every layer is adapted, as on 7B; not on their 13B).
        out.skip_unadapted_layers = True
    explicit_backbone = getattr(ns, "model", None) is not None or getattr(ns, "llama_model_path", None) is not None
    for key in MODEL_OPTIONS:
        if getattr(out, key, None) is None and stored.get(key) is not None:
            if key == "tokenizer_path" and explicit_backbone:
                continue
            setattr(out, key, stored[key])
    return out


def resolve(ns: argparse.Namespace) -> argparse.Namespace:
    """Defaults < preset < explicit flags. Returns a plain Namespace with every RunConfig field
    (the type the authors' checkpoints store under ``args``)."""
    values = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    preset = getattr(ns, "preset", None)
    if preset:
        if preset not in PRESETS:
            raise FlipVQAError(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    for name in values:
        given = getattr(ns, name, None)
        if given is not None:
            values[name] = given
    for name in ("batch_size", "epochs", "accum_iter", "max_seq_len", "max_feats", "adapter_len"):
        if values[name] < 1:
            raise FlipVQAError(f"--{name} must be at least 1 (got {values[name]})")
    if values["warmup_epochs"] < 0:
        raise FlipVQAError(f"--warmup_epochs must be >= 0 (got {values['warmup_epochs']})")
    for name in ("save_every", "skip_nonfinite"):
        if values[name] < 0:
            raise FlipVQAError(f"--{name} must be >= 0 (got {values[name]})")
    if values["resume"] == "auto" and values["overwrite"]:
        raise FlipVQAError("--resume auto continues a run and --overwrite starts over: choose one")
    if values["num_workers"] < 0:
        raise FlipVQAError(f"--num_workers must be >= 0 (got {values['num_workers']})")
    if values["max_new_tokens"] < 1:
        raise FlipVQAError(f"--max_new_tokens must be at least 1 (got {values['max_new_tokens']})")
    if values["temperature"] < 0:
        raise FlipVQAError(f"--temperature must be 0 (greedy) or more (got {values['temperature']})")
    if not 0 < values["top_p"] <= 1:
        raise FlipVQAError(f"--top_p must be in (0, 1] (got {values['top_p']})")
    if values["dtype"] is not None:
        values["dtype"] = parse_dtype(values["dtype"])
    if values["quantize"] is not None:
        values["quantize"] = str(values["quantize"]).lower()
        if values["quantize"] not in QUANTIZE_CHOICES:
            raise FlipVQAError(f"--quantize {values['quantize']}: choose one of {', '.join(QUANTIZE_CHOICES)}")
        if values["fsdp"]:
            raise FlipVQAError("--quantize and --fsdp cannot be combined: choose one way to fit the backbone")
    return argparse.Namespace(**values)
