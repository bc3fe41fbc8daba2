"""Rebuild the trained demo model that ships in the package (what ``flipvqa serve`` serves when
no ``--resume`` is given), and its example questions.

    python scripts/build_demo_checkpoint.py

trains the demo's Flipped-VQA variant with the demo's own recipe (``flipvqa.demo.RECIPE``, seed 0,
the full synthetic dataset, half multiple-choice and half open-ended; about a minute on 2 CPU
cores) and writes, under ``src/flipvqa/assets/demo/``:

* ``checkpoint.pth``: the trainable weights of the best epoch and the run's options, without the
  optimizer state (a few hundred KB); the backbone is the shipped ``demo-llama``;
* ``examples.json``: a handful of validation questions, one per question type, with their choices,
  answer (the correct choice's index), ``answers`` (the acceptable answers in words, for the
  question asked without its choices) and what each sampled frame of their video shows (the
  synthetic activity);
* ``examples.pth``: those videos' frame features ``{video id: float16 [frames, 768]}``.

The training is deterministic on the CPU, so the files come out the same on every run of this script
on the same software. At the end it asks the shipped model every example's question with its
choices and without (answered in words) and prints how many it gets right.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from flipvqa.checkpoints import load_checkpoint
from flipvqa.demo import ASSETS, FULL, RECIPE, VARIANTS, prepare_data, report, train_and_evaluate
from flipvqa.demo.synthetic import MAX_FEATS, generate, narration
from flipvqa.openended import exact_match

EXAMPLE_TYPES = ("CW", "CH", "TN", "TP", "TC", "DC", "DO")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_path = prepare_data(work, 0, FULL, blind=False)
        result = train_and_evaluate(VARIANTS["full"], data_path, work, 0, RECIPE["epochs"])
        ckpt = load_checkpoint(result["checkpoint"])
        scores = report.scores(result["eval"]["predictions"])
    run_args = vars(ckpt["args"])
    kept = {k: run_args[k] for k in ("model", "adapter_len", "adapter_layer", "max_seq_len", "max_feats", "bias",
                                     "tau", "sub", "skip_unadapted_layers", "dataset", "vaq", "qav")}
    torch.save({"model": {k: v.clone() for k, v in ckpt["model"].items()}, "epoch": ckpt["epoch"],
                "args": argparse.Namespace(**kept, llama_model_path="", tokenizer_path=None),
                "accuracy": result["eval"]["accuracy"],
                "multiple_choice_accuracy": scores["multiple_choice"]["all"],
                "open_ended_exact_match": scores["open_ended"]["all"]}, args.out / "checkpoint.pth")
    write_examples(args.out)
    print(f"{args.out / 'checkpoint.pth'}: val accuracy {result['eval']['accuracy']:.3f} (multiple-choice "
          f"{scores['multiple_choice']['all']:.3f}, open-ended exact match {scores['open_ended']['all']:.3f}; "
          f"epoch {ckpt['epoch']})")
    by_choice, in_words = check_examples(args.out)
    print(f"examples right: {sum(by_choice)}/{len(by_choice)} by choice, {sum(in_words)}/{len(in_words)} in words")


def write_examples(out: Path) -> None:
    """One validation question of each type, the first of its type."""
    val = generate(0, FULL)["val"]
    videos = {v.vid: v for v in val.videos}
    examples, features = [], {}
    for qtype in EXAMPLE_TYPES:
        q = next(q for q in val.questions if q.qtype == qtype)
        examples.append({"id": f"{qtype.lower()}-{q.vid}", "video": q.vid, "question": q.question,
                         "choices": list(q.options), "answer": q.answer, "answers": q.answers, "type": qtype,
                         "frames": narration(videos[q.vid], MAX_FEATS)})
        features[q.vid] = val.features[q.vid].clone()
    (out / "examples.json").write_text(json.dumps(examples, indent=1) + "\n")
    torch.save(features, out / "examples.pth")


def check_examples(out: Path) -> tuple[list[bool], list[bool]]:
    """Whether the model under ``out`` gets each example right, with its choices and in words."""
    from flipvqa.ask import Answerer

    answerer = Answerer(out / "checkpoint.pth", llama_model_path=str(out), model="demo-llama", device="cpu")
    examples = json.loads((out / "examples.json").read_text())
    features = torch.load(out / "examples.pth", weights_only=True)
    by_choice, in_words = [], []
    for e in examples:
        video = features[e["video"]].float()
        by_choice.append(answerer.ask(video, e["question"], e["choices"]).index == e["answer"])
        said = answerer.generate(video, e["question"]).answer
        in_words.append(exact_match(said, e["answers"]))
        print(f"  {e['id']:<12} {e['question']:<52} {said!r:<14} {'right' if in_words[-1] else 'wrong'} "
              f"(accepts {', '.join(e['answers'])})")
    return by_choice, in_words


if __name__ == "__main__":
    main()
