"""The ``flipvqa`` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import logging
import os
import sys
from typing import Callable, Optional

# Nothing imported here may import torch: the import takes seconds, and a Ctrl-C during it must
# reach main()'s handler ("flipvqa: interrupted"), not print a traceback.
from . import __version__
from .config import PRESETS, add_run_arguments, ignored_training_flags, resolve, with_stored_options
from .errors import FlipVQAError, Interrupted

log = logging.getLogger("flipvqa")

DESCRIPTION = """Flipped-VQA (Ko et al., EMNLP 2023): LLaMA-based multiple-choice video question
answering. The training and evaluation flags are those of the authors' train.py; run
'flipvqa COMMAND --help' for a command's own flags."""


def _train(ns: argparse.Namespace) -> int:
    from .train import train

    result = train(resolve(ns))
    if result["best_epoch"] is None:
        log.info("done; no epoch had a validation accuracy above 0, so no checkpoint was written")
    else:
        log.info("best val accuracy %.4f at epoch %d; checkpoint: %s/checkpoint_best.pth",
                 result["best_acc"], result["best_epoch"], result["output_dir"])
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from .checkpoints import load_checkpoint
    from .checkpoints.trainable import stored_args
    from .evaluate import evaluate

    ignored = ignored_training_flags(ns)
    if ignored:
        log.warning("eval ignores the training options %s (accepted because the authors' evaluation "
                    "command is their training command with --resume)", " ".join(ignored))
    ckpt = None
    if ns.resume:  # the model options the checkpoint was trained with, unless given
        ckpt = load_checkpoint(ns.resume)
        ns = with_stored_options(ns, stored_args(ckpt))
    result = evaluate(resolve(ns), ckpt)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if getattr(ns, "json", False):
        print(json.dumps(result))
        return 0
    if result["accuracy"] is None:
        print(f"{result['n']} questions without answers: predictions only, no accuracy")
    else:
        print(f"accuracy: {result['accuracy']:.4f} ({result['n']} questions)")
    for name, acc in result["per_type"].items():
        print(f"  {name:<12} {acc:.4f}")
    oe = result.get("open_ended")
    if oe and "exact_match" in oe:
        wups = "" if oe["wups0"] is None else f", WUPS@0.0 {oe['wups0']:.4f}, WUPS@0.9 {oe['wups9']:.4f}"
        print(f"open-ended ({oe['n']} questions): exact match {oe['exact_match']:.4f}, F1 {oe['f1']:.4f}{wups}")
    if oe and oe["cut"]:
        print(f"  {oe['cut']} answers cut by --max_new_tokens")
    if result["predictions"]:
        print(f"predictions: {result['predictions']}")
    return 0


# name -> (module with add_arguments/run, help); modules load only when their command runs,
# so an optional dependency of one command never breaks another.
PLUGINS = {
    "demo": ("flipvqa.demo", "train and evaluate a tiny Flipped-VQA model on synthetic videos, offline, on a CPU"),
    "bench": ("flipvqa.bench", "measure training and evaluation throughput (prints one JSON line)"),
    "extract-features": ("flipvqa.features.extract", "extract frame features (CLIP ViT-L/14, other CLIP or SigLIP towers) from video files"),
    "ask": ("flipvqa.ask_command", "answer a question about a video file: rank its choices, or answer in words"),
    "serve": ("flipvqa.serve", "a web page and a JSON API answering questions about videos (the demo model by default)"),
    "report": ("flipvqa.report", "write an HTML report of training runs (losses, accuracy, mistakes)"),
    "data": ("flipvqa.data.check", "check a dataset (every split, every line, the features); pack its features"),
}


class Parser(argparse.ArgumentParser):
    """Usage errors in one line naming the command, plus where its flags are listed (argparse would
    print the whole usage block first, which buries the line that matters)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _unrecognized(parser: argparse.ArgumentParser, argv: list[str], extra: list[str]) -> str:
    """The one line for flags the command does not take: its name and the closest flag it has."""
    command = parser
    for arg in argv:  # the deepest sub-command named in argv ("flipvqa data check")
        sub = next((a for a in command._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            break
        if arg in sub.choices:
            command = sub.choices[arg]
    flags = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in extra:
        close = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.6) if arg.startswith("-") else []
        if close:
            hints.append(f"{arg.split('=')[0]}: did you mean {close[0]}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"{command.prog}: error: unrecognized arguments: {' '.join(extra)}{hint} (see {command.prog} --help)"


def _quiet_flag(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="only warnings and errors, no progress bars")


def build_parser(argv: Optional[list[str]] = None) -> argparse.ArgumentParser:
    """The parser; a plugin command's own flags are added only when ``argv`` runs it."""
    command = next((a for a in (argv or []) if not a.startswith("-")), None)
    parser = Parser(prog="flipvqa", description=DESCRIPTION)
    _quiet_flag(parser, False)
    parser.add_argument("--version", action="version", version=f"flipvqa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train Flipped-VQA (the authors' train.py flags)",
                           description="Train the Flipped-VQA parts on a frozen backbone. Presets (the paper's "
                                       "runs): " + ", ".join(PRESETS) + ".")
    add_run_arguments(train, "train")
    train.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="evaluate a checkpoint on a split and write predictions",
                        description="Score every option of every question of --split. The model options "
                                    "(backbone, adapter, max_feats, ...) come from the --resume checkpoint "
                                    "unless given.")
    add_run_arguments(ev, "eval")
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ev.set_defaults(func=_eval)
    for name, (module, help_text) in PLUGINS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.set_defaults(plugin=module)
        if name == command:  # only the chosen command's module is imported
            _module(module).add_arguments(p)
    for p in sub.choices.values():  # -q also after the command; SUPPRESS keeps the one before it
        _quiet_flag(p, argparse.SUPPRESS)
    return parser


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        extra = "serve" if exc.name in ("fastapi", "uvicorn", "multipart", "python_multipart") else "video"
        raise FlipVQAError(f"this command needs the Python package '{exc.name}' "
                           f"(pip install 'flipvqa[{extra}]' or pip install {exc.name})") from None


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    finished = False
    try:
        from .io import show_progress  # imports torch: inside the try, for Ctrl-C

        parser = build_parser(argv)
        ns, extra = parser.parse_known_args(argv)
        if extra:
            print(_unrecognized(parser, argv, extra), file=sys.stderr)
            return 2
        worker = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 talks
        level = logging.ERROR if worker else logging.WARNING if ns.quiet else logging.INFO
        logging.basicConfig(level=level, format="%(message)s", force=True)
        show_progress(not (ns.quiet or worker))
        run: Callable = ns.func if hasattr(ns, "func") else _module(ns.plugin).run
        code = run(ns)
        finished = code == 0
        return code
    except FlipVQAError as exc:
        print(f"flipvqa: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # a training run stopped by a signal, its state saved
        print(f"flipvqa: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("flipvqa: interrupted", file=sys.stderr)
        return 130
    finally:
        if "flipvqa.devices" in sys.modules:  # it set up torch.distributed: leave the group cleanly
            from .devices import close_distributed

            close_distributed(wait=finished)


if __name__ == "__main__":
    sys.exit(main())
