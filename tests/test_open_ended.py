"""Open-ended questions (docs/faithfulness.md, "Open-ended questions"): the three sequences and
their targets against an independent construction from the text, the losses against a
cross-entropy computed from those, mixed batches, the generic format's open-ended rows and their
bad input, and train / eval end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from flipvqa import data
from flipvqa.cli import main
from flipvqa.data.dataset import VQADataset, collate
from flipvqa.io import read_jsonl
from flipvqa.prompts import INSTRUCTIONS, build, open_prompt_text

from conftest import case_dir, case_flags, expected
from test_cli_usability import flipvqa, one_line_error
from test_model import reference_model

ANSWERS = ("to catch a bus", "5", "3 times", "Question", "the Video:")


# ---------------------------------------------------------------------------- the definition
def defined(tok, task, question, answer, v):
    """(ids, first target, video start) of section 11's sequence, built from the text alone: the
    targets start after the tokens of the text up to 'The answer is' / 'Question:'."""
    q_text, a_text = f"Question: {question}\n", "Answer: The answer is "
    if task == "qav":
        ids = [tok.bos_id] + tok.encode(INSTRUCTIONS[("qav", False)] + q_text + a_text + answer + "\nVideo:")
        return ids + [0] * v + [tok.eos_id], len(ids), len(ids)
    head = [tok.bos_id] + tok.encode(INSTRUCTIONS[(task, False)] + "Video:")
    prefix = head + [0] * v + [tok.newline_id]
    if task == "vqa":
        body, before = q_text + a_text + answer, q_text + "Answer: The answer is"
    else:
        body = a_text + answer + "\n" + q_text.strip()
        before = a_text + answer + "\nQuestion:"
    return prefix + tok.encode(body) + [tok.eos_id], len(prefix) + len(tok.encode(before)), len(head)


@pytest.mark.parametrize("task", ["vqa", "vaq", "qav"])
@pytest.mark.parametrize("answer", ANSWERS)
def test_sequences_follow_the_definition(task, answer, llama_tokenizer):
    text = open_prompt_text("Why did the boy run?")
    seq = build(llama_tokenizer, task, text, answer, 4, 200, False)
    ids, first, video = defined(llama_tokenizer, task, "Why did the boy run?", answer, 4)
    assert seq.ids == ids
    assert seq.video_start == video
    if task != "qav":
        assert seq.label_start == first


def test_a_leading_digit_makes_the_lone_space_piece_a_target(llama_tokenizer):
    text = open_prompt_text("How many times?")
    seq = build(llama_tokenizer, "vqa", text, "5", 4, 200, False)
    assert llama_tokenizer.sp.id_to_piece(seq.ids[seq.label_start]) == "▁"
    assert seq.ids[seq.label_start:] == [29871, 29945, llama_tokenizer.eos_id]


def open_records(name, split, mixed=False):
    case = expected(name)["case"]
    records = data.load_split(case_dir(name) / case["data_path"], name, split, case["sub"])
    for k, rec in enumerate(records):
        if not mixed or k % 2 == 0:
            rec.answers, rec.options, rec.answer = [rec.options[rec.answer]], [], None
    return records, case


@pytest.mark.parametrize("name", ["nextqa", "tvqa"])
def test_losses_are_the_cross_entropy_of_the_defined_targets(name, llama_tokenizer):
    """VQA and VAQ losses of open-ended (and mixed) batches equal the mean cross-entropy of the
    defined targets computed from full-sequence logits (the naive mode); QAV is computed on."""
    model, case = reference_model(name)
    records, case = open_records(name, "train", mixed=True)
    ds = VQADataset(records, llama_tokenizer, None, case["max_feats"], case["max_seq_len"], case["sub"], train=True)
    batch = collate([ds[i] for i in range(min(len(ds), 4))])
    with torch.no_grad():
        vqa, vaq, qav = model(batch)
        model.naive = True
        naive = model(batch)
        model.naive = False
    for task, value, check in (("vqa", vqa, naive[0]), ("vaq", vaq, naive[1])):
        tb = batch.tasks[task]
        frames = model.video_inputs(batch.video)[1]
        with torch.no_grad():
            logits = model.backbone.output(model.backbone.norm(model.hidden(tb, model.embed(tb, frames), True)))
        losses = [F.cross_entropy(logits[r, t - 1], tb.ids[r, t], reduction="sum")
                  for r in range(tb.ids.shape[0]) for t in range(int(tb.label_start[r]), int(tb.length[r]))]
        assert value.item() == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
        assert value.item() == pytest.approx(check.item(), abs=1e-5)
    assert torch.isfinite(qav) and qav.item() == pytest.approx(naive[2].item(), abs=1e-5)


def test_mixed_batches_keep_multiple_choice_scores(llama_tokenizer):
    """A multiple-choice question scored in a batch with open-ended ones gets the scores it gets
    alone (the reference's)."""
    from flipvqa.loops import Answering, answer_batch
    from flipvqa.model.generate import Sampling
    from conftest import expected_val

    model, case = reference_model("nextqa")
    records, case = open_records("nextqa", "val", mixed=True)
    ds = VQADataset(records, llama_tokenizer, None, case["max_feats"], case["max_seq_len"], case["sub"],
                    train=False)
    answering = Answering(Sampling(4, (llama_tokenizer.eos_id,)), llama_tokenizer.decode)
    rows = answer_batch(model, collate([ds[i] for i in range(len(ds))]), torch.autocast("cpu", enabled=False),
                        answering)
    reference = expected_val("nextqa")
    choice_rows = [r for r in rows if "scores" in r]
    open_rows = [r for r in rows if "correct" in r]
    assert choice_rows and open_rows and len(rows) == len(ds)
    for r in choice_rows:
        assert r["scores"] == pytest.approx(reference[r["index"]][0], abs=1e-4)
    for r in open_rows:
        assert isinstance(r["prediction"], str) and r["answer"] == ds.records[r["index"]].answers


# ---------------------------------------------------------------------------- the generic format
def write_open_dataset(root, name="oe", splits=("train", "val"), mixed=True, test_split=False):
    """The nextqa case in the generic format, every other question asked without its choices."""
    out = root / name
    out.mkdir(parents=True)
    src = case_dir("nextqa") / "data"
    for split in splits:
        records = data.load_split(src, "nextqa", split)
        rows = []
        for k, rec in enumerate(records):
            row = {"video": rec.vid, "question": rec.question, "type": "TN" if k % 3 else "DC"}
            if mixed and k % 2:
                row.update(options=rec.options, answer=rec.answer)
            else:
                row["answer"] = [rec.options[rec.answer], "something else"]
            rows.append(row)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if test_split:
        rows = [{"video": r.vid, "question": r.question} for r in data.load_split(src, "nextqa", "val")]
        (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "features.pth").write_bytes((src / "nextqa" / "clipvitl14.pth").read_bytes())
    return name


def test_generic_open_ended_rows_and_csv(tmp_path):
    name = write_open_dataset(tmp_path)
    records = data.load_split(tmp_path, name, "train")
    assert any(r.open_ended for r in records) and any(not r.open_ended for r in records)
    first = next(r for r in records if r.open_ended)
    assert first.answers[1] == "something else" and first.target == first.answers[0]
    (tmp_path / "csvset").mkdir()
    (tmp_path / "csvset" / "val.csv").write_text("video,question,answer\nv1,what is it,a dog\n")
    (tmp_path / "csvset" / "features.pth").write_bytes((tmp_path / name / "features.pth").read_bytes())
    (rec,) = data.load_split(tmp_path, "csvset", "val")
    assert rec.open_ended and rec.answers == ["a dog"] and rec.question == "What is it?"


@pytest.mark.parametrize("answer, message", [
    ('""', "an answer is empty"),
    ("[]", "empty list"),
    ('["a", 3]', "must be a string or a list of strings"),
    ("7", "must be a string or a list of strings"),
])
def test_bad_open_answers_are_one_line(tmp_path, answer, message, capsys):
    name = write_open_dataset(tmp_path, splits=("val",))
    path = tmp_path / name / "train.jsonl"
    path.write_text('{"video": "v", "question": "what?", "answer": "fine"}\n'
                    f'{{"video": "v", "question": "what?", "answer": {answer}}}\n'
                    '{"video": "v", "question": "what?"}\n')
    code = main(["data", "check", "--dataset", name, "--data_path", str(tmp_path),
                 "--llama_model_path", str(case_dir("nextqa") / "../../llama"), "--model", "tiny"])
    out = capsys.readouterr().out
    assert code == 2
    assert f"{path}:2: " in out and message in out
    assert "question 2 (video v) has no answer" in out or "some questions have an answer" in out
    assert "open-ended" in out


def test_train_and_eval_end_to_end(tmp_path, capsys):
    name = write_open_dataset(tmp_path, test_split=True)
    flags = case_flags("nextqa") + ["--dataset", name, "--data_path", str(tmp_path), "--batch_size", "2",
                                    "--max_new_tokens", "6"]
    out = tmp_path / "run"
    assert main(["train", *flags, "--epochs", "1", "--warmup_epochs", "1", "--vaq", "--qav",
                 "--output_dir", str(out)]) == 0
    entry = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert 0 <= entry["val_acc"] <= 1 and entry["train_loss"] > 0
    capsys.readouterr()
    ckpt = next(p for p in (out / "checkpoint_last.pth", out / "checkpoint_best.pth") if p.is_file())
    assert main(["eval", *flags, "--resume", str(ckpt), "--output_dir", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "open-ended" in printed and "exact match" in printed
    rows = read_jsonl(tmp_path / "ev" / "predictions_val.jsonl")
    open_rows = [r for r in rows if "correct" in r]
    assert open_rows and all(isinstance(r["prediction"], str) and isinstance(r["answer"], list) for r in open_rows)
    assert all("scores" in r for r in rows if "correct" not in r)
    # a split without answers: predictions only
    assert main(["eval", *flags, "--resume", str(ckpt), "--split", "test", "--output_dir", str(tmp_path / "t")]) == 0
    assert "without answers" in capsys.readouterr().out
    rows = read_jsonl(tmp_path / "t" / "predictions_test.jsonl")
    assert all(r["answer"] is None and r["correct"] is None and isinstance(r["prediction"], str) for r in rows)


@pytest.mark.parametrize("flag, value, message", [
    ("--max_new_tokens", "0", "--max_new_tokens must be at least 1"),
    ("--max_new_tokens", "-3", "--max_new_tokens must be at least 1"),
    ("--temperature", "-0.5", "--temperature must be 0"),
    ("--top_p", "0", "--top_p must be in (0, 1]"),
    ("--top_p", "1.5", "--top_p must be in (0, 1]"),
])
def test_bad_generation_flags_are_one_line(tmp_path, flag, value, message):
    name = write_open_dataset(tmp_path, splits=("val",))
    flags = case_flags("nextqa") + ["--dataset", name, "--data_path", str(tmp_path)]
    for command in ("eval", "train"):
        if command == "train" and flag != "--max_new_tokens":
            continue  # training validates greedily: it takes no sampling flags
        run = flipvqa(command, *flags, flag, value, "--output_dir", tmp_path / command)
        assert message in one_line_error(run)
        assert not (tmp_path / command).exists()
