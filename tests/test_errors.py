"""Bad input gets one line naming the file and the problem, exit status 2, no traceback."""

import json
import shutil

import pytest
import torch

from flipvqa.cli import main

from conftest import case_dir, case_flags


def run_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def copy_case(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(case_dir(name) / "data", dst)
    return dst


def eval_args(name, data_path, **kw):
    flags = case_flags(name, resume=case_dir(name) / "checkpoint.pth", **kw)
    flags[flags.index("--data_path") + 1] = str(data_path)
    return ["eval", *flags]


def test_missing_annotation_file(tmp_path, capsys):
    data = copy_case("nextqa", tmp_path)
    (data / "nextqa" / "val.csv").unlink()
    line = run_error(capsys, eval_args("nextqa", data, output_dir=tmp_path))
    assert "val.csv" in line and "not found" in line


def test_missing_column(tmp_path, capsys):
    data = copy_case("nextqa", tmp_path)
    path = data / "nextqa" / "val.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(l.rsplit(",", 1)[0] for l in lines) + "\n")  # drop column a4
    line = run_error(capsys, eval_args("nextqa", data, output_dir=tmp_path))
    assert "val.csv" in line and "'a4'" in line


def test_wrong_number_of_options(tmp_path, capsys):
    data = copy_case("star", tmp_path)
    path = data / "star" / "STAR_val.json"
    rows = json.loads(path.read_text())
    rows[1]["choices"] = rows[1]["choices"][:3]
    path.write_text(json.dumps(rows))
    line = run_error(capsys, eval_args("star", data, output_dir=tmp_path))
    assert "STAR_val.json" in line and "3 choices" in line


def test_checkpoint_that_does_not_fit(tmp_path, capsys):
    line = run_error(capsys, eval_args("nextqa", case_dir("nextqa") / "data", output_dir=tmp_path,
                                       adapter_len=5))
    assert "checkpoint.pth" in line and "adapter_query.weight" in line and "shape" in line


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path, capsys):
    bad = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": shutil.copytree}, bad)  # a global outside the allow-list
    flags = case_flags("nextqa", resume=bad, output_dir=tmp_path)
    line = run_error(capsys, ["eval", *flags])
    assert "evil.pth" in line and "not unpickled" in line and "shutil.copytree" in line


def test_missing_backbone(tmp_path, capsys):
    flags = case_flags("nextqa", output_dir=tmp_path, model="no-such-model")
    line = run_error(capsys, ["eval", *flags, "--untrained"])
    assert "no-such-model" in line


def test_missing_features_file(tmp_path, capsys):
    data = copy_case("dramaqa", tmp_path)
    (data / "dramaqa" / "clipvitl14.pth").unlink()
    line = run_error(capsys, eval_args("dramaqa", data, output_dir=tmp_path))
    assert "clipvitl14.pth" in line


def test_unknown_preset_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "nope"])


def test_preset_fills_the_paper_flags_and_explicit_flags_win():
    from flipvqa.cli import build_parser
    from flipvqa.config import resolve

    ns = build_parser().parse_args(["train", "--preset", "tvqa", "--batch_size", "2"])
    args = resolve(ns)
    assert (args.dataset, args.max_seq_len, args.accum_iter, args.blr, args.sub, args.vaq, args.qav) == \
           ("tvqa", 650, 4, 7e-2, True, True, True)
    assert args.batch_size == 2
