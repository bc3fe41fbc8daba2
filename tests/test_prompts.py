"""Token ids, label starts and video positions of every reference item."""

import pytest

from flipvqa import data
from flipvqa.data.dataset import VQADataset
from flipvqa.prompts import LETTERS, normalize_question, prompt_text

from conftest import CASES, case_dir, expected


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("split", ["train", "val"])
def test_sequences_match_reference(name, split, llama_tokenizer):
    exp = expected(name)
    case = exp["case"]
    records = data.load_split(case_dir(name) / case["data_path"], name, split, case["sub"])
    ds = VQADataset(records, llama_tokenizer, data.n_options(name), case["max_feats"], case["max_seq_len"],
                    case["sub"], train=split == "train")
    assert len(ds) == len(exp[split]["items"])
    for i, want in enumerate(exp[split]["items"]):
        item = ds[i]
        assert (item.record.vid, item.record.answer, item.record.qtype, item.video_len) == \
               (want["vid"], want["answer"], want["qtype"], want["video_len"])
        for task in ("vqa", "vaq", "qav"):
            seqs = item.sequences[task]
            assert [s.ids for s in seqs] == want[task]["ids"], (i, task)
            assert [s.label_start for s in seqs] == want[task]["label_start"], (i, task)
            assert seqs[0].video_start == want[task]["video_start"], (i, task)
            start = seqs[0].label_start
            assert list(range(start, start + case["max_feats"])) == want[task]["video_index"]


def test_question_normalisation():
    assert normalize_question("why did the BOY run ") == "Why did the boy run?"
    assert normalize_question("what?") == "What?"


def test_answer_targets_are_the_letter_and_eos(llama_tokenizer):
    from flipvqa.prompts import build

    text = prompt_text("Why?", ["a", "b", "c"])
    seq = build(llama_tokenizer, "vqa", text, 2, max_feats=4, max_seq_len=200, sub=False)
    targets = seq.ids[seq.label_start:]
    assert targets[-1] == llama_tokenizer.eos_id
    assert llama_tokenizer.sp.decode(targets[:-1]).strip() == LETTERS[2]
    vaq = build(llama_tokenizer, "vaq", text, 2, max_feats=4, max_seq_len=200, sub=False)
    assert llama_tokenizer.sp.decode(vaq.ids[vaq.label_start:-1]).strip() == "Why?"
