"""The packed feature store (flipvqa.data.store) and ``flipvqa data pack``: the same tensors as the
.pth bit for bit, preferred by the readers, the same predictions in ``flipvqa eval``, one line for
each kind of bad file, and atomic writes."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from flipvqa.cli import main
from flipvqa.data import features_file, store
from flipvqa.data.pack import merge, pack
from flipvqa.data.records import load_features
from flipvqa.errors import FlipVQAError

from conftest import CASES, case_dir, case_flags

KINDS = [(768, torch.float16), (512, torch.bfloat16), (33, torch.float32), (7, torch.float64)]


def features(width, dtype, seed=0, frames=(3, 10, 0, 1, 5)):
    """{video id: [frames, width]}, one video with no frame."""
    gen = torch.Generator().manual_seed(seed)
    return {f"v{i}": torch.randn(n, width, generator=gen).to(dtype) for i, n in enumerate(frames)}


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flipvqa: error: ")
    return err[0]


# ---------------------------------------------------------------------------- what a store holds
@pytest.mark.parametrize("width,dtype", KINDS)
def test_pack_reads_back_bit_for_bit(tmp_path, width, dtype, capsys):
    feats = features(width, dtype)
    torch.save(feats, tmp_path / "f.pth")
    (tmp_path / "f.pth.json").write_text(json.dumps({"encoder": "x", "feature_dim": width, "fps": 1.0}))
    assert main(["data", "pack", str(tmp_path / "f.pth")]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'f.safetensors'}: 5 videos"
    packed = load_features(tmp_path / "f.pth")  # the store beside the .pth, not the .pth
    assert isinstance(packed, store.PackedFeatures)
    assert list(packed) == list(feats) and len(packed) == 5 and packed.width == width
    assert packed.encoder == {"encoder": "x", "feature_dim": width, "fps": 1.0}
    assert all(same(packed[k], v) for k, v in feats.items())
    assert all(same(a, b) for a, b in zip(packed.values(), feats.values()))
    assert [k for k, _ in packed.items()] == list(packed.keys()) == list(feats)
    assert packed["v2"].shape == (0, width) and "v2" in packed and "nope" not in packed
    assert packed.get("nope") is None and same(packed.get("v1"), feats["v1"])
    # A DataLoader worker gets the path, not the frames, and reopens the file.
    blob = pickle.dumps(packed)
    assert len(blob) < 500 and all(same(pickle.loads(blob)[k], v) for k, v in feats.items())
    # Each video is its own small storage: pickling one video does not pickle the whole store.
    assert packed["v1"].untyped_storage().nbytes() == 10 * width * packed["v1"].element_size()
    os.utime(tmp_path / "f.safetensors", ns=(1, 1))  # as if packed again after the pickling
    with pytest.raises(FlipVQAError, match="f.safetensors: the packed store changed after it was opened"):
        pickle.loads(blob)


def test_any_safetensors_reader_opens_it(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    feats = features(768, torch.float16)
    store.write_store(tmp_path / "f.safetensors", feats)
    with safetensors.safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        frames, offsets, counts = f.get_tensor("frames"), f.get_tensor("offsets"), f.get_tensor("counts")
        videos = json.loads(f.metadata()["videos"])
    for vid, o, n in zip(videos, offsets.tolist(), counts.tolist()):
        assert same(frames[o:o + n], feats[vid])


def test_empty_store(tmp_path):
    store.write_store(tmp_path / "e.safetensors", {}, encoder={"feature_dim": 768})
    empty = store.open_store(tmp_path / "e.safetensors")
    assert len(empty) == 0 and empty.width == 768 and list(empty.items()) == []


def test_readers_prefer_the_packed_store(tmp_path, caplog):
    pth = tmp_path / "clipvitl14.pth"
    torch.save(features(768, torch.float16), pth)
    assert isinstance(load_features(pth), dict)  # no store yet
    pack(pth)
    assert isinstance(load_features(pth), store.PackedFeatures)
    later = os.stat(pth.with_suffix(".safetensors")).st_mtime + 10
    os.utime(pth, (later, later))  # the .pth changed after packing: the store is stale
    assert isinstance(load_features(pth), dict)
    assert "newer than its packed store" in caplog.text and "flipvqa data pack" in caplog.text
    pth.unlink()  # the store alone will do, also for the generic format's file names
    assert isinstance(load_features(pth), store.PackedFeatures)
    (tmp_path / "clipvitl14.safetensors").rename(tmp_path / "features.safetensors")
    assert features_file("mine", tmp_path) == tmp_path / "features.pth"
    assert isinstance(load_features(features_file("mine", tmp_path)), store.PackedFeatures)


@pytest.mark.parametrize("name", CASES)
def test_eval_gives_the_same_predictions_from_a_packed_store(tmp_path, name):
    data = tmp_path / "data"
    shutil.copytree(case_dir(name) / "data", data)

    def predictions(out):
        flags = case_flags(name, resume=case_dir(name) / "checkpoint.pth", output_dir=tmp_path / out, batch_size=3)
        flags[flags.index("--data_path") + 1] = str(data)
        assert main(["-q", "eval", *flags]) == 0
        return (tmp_path / out / "predictions_val.jsonl").read_text()

    with_pth = predictions("pth")
    pth = data / name / "clipvitl14.pth"
    pack(pth)
    pth.unlink()  # so that only the store can have been read
    assert predictions("packed") == with_pth


# ---------------------------------------------------------------------------- bad input
def rewrite(path, header=None, offsets=None, counts=None):
    """Rewrite a store's header (``header(h)`` edits it) or its offsets/counts, keeping the frames."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h, data = json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])
    for name, values in (("offsets", offsets), ("counts", counts)):
        if values is not None:
            start, end = h[name]["data_offsets"]
            data[start:end] = np.asarray(values, "<i8").tobytes()
    if header:
        header(h)
    blob = json.dumps(h).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(data))


def set_meta(key, value):
    return lambda h: h["__metadata__"].__setitem__(key, value)


BAD = {  # what is wrong -> (how to make it, what the one line says)
    "offset beyond the rows": (dict(offsets=[0, 3, 13, 13, 20]), "beyond the 19 rows"),
    "rows not covered": (dict(counts=[3, 9, 0, 1, 5]), "rows 12..13 belong to no video"),
    "rows shared": (dict(offsets=[0, 2, 13, 13, 14]), "share rows"),
    "last rows not covered": (dict(counts=[3, 10, 0, 1, 4]), "rows 18..19 belong to no video"),
    "index too short": (dict(header=set_meta("videos", '["v0", "v1"]')), "lists 2 videos but has 5 offsets"),
    "width mismatch": (dict(header=set_meta("width", "512")), "frames are 512-d, but the frames tensor is 19x768"),
    "encoder width": (dict(header=set_meta("encoder", '{"feature_dim": 512}')), "encoder gives 512-d"),
    "not a store": (dict(header=lambda h: h.pop("__metadata__")), "not a packed feature store"),
    "bad tensor": (dict(header=lambda h: h["frames"].__setitem__("dtype", "I32")), "no valid 'frames' tensor"),
    "overlap": (dict(header=lambda h: h["counts"].__setitem__("data_offsets", [0, 40])), "overlap"),
}


@pytest.mark.parametrize("what", BAD)
def test_a_damaged_store_is_one_line_naming_it(tmp_path, what, capsys):
    path = tmp_path / "f.safetensors"
    store.write_store(path, features(768, torch.float16, frames=(3, 10, 0, 1, 5)))
    edit, says = BAD[what]
    rewrite(path, **edit)
    with pytest.raises(FlipVQAError) as err:
        store.open_store(path)
    assert str(err.value).startswith(f"{path}: ") and says in str(err.value) and "\n" not in str(err.value)
    merged = ["--output", str(tmp_path / "m.safetensors")]
    assert says in error_line(capsys, ["data", "pack", "--merge", str(path), *merged])


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "f.safetensors"
    store.write_store(path, features(768, torch.float16))
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])  # a copy that did not finish
    with pytest.raises(FlipVQAError, match=r"f\.safetensors: truncated: .* pack or copy it again"):
        store.open_store(path)
    path.write_bytes(whole[:5])
    with pytest.raises(FlipVQAError, match=r"f\.safetensors: truncated or not a packed feature store"):
        store.open_store(path)
    path.write_bytes(whole + b"x")
    with pytest.raises(FlipVQAError, match="1 bytes more than its header describes"):
        store.open_store(path)
    with pytest.raises(FlipVQAError, match=r"nope\.safetensors: packed features file not found"):
        load_features(tmp_path / "nope.safetensors")
    with pytest.raises(FlipVQAError, match=r"nope\.pth: features file not found"):
        load_features(tmp_path / "nope.pth")


def test_pack_refuses_what_one_store_cannot_hold(tmp_path, capsys):
    feats = features(768, torch.float16)
    feats["odd"] = torch.zeros(2, 512, dtype=torch.float16)
    torch.save(feats, tmp_path / "mixed.pth")
    line = error_line(capsys, ["data", "pack", str(tmp_path / "mixed.pth")])
    assert "mixed.pth: videos 'v0' (768-d torch.float16) and 'odd' (512-d" in line
    assert not (tmp_path / "mixed.safetensors").exists()
    torch.save({"v": torch.zeros(2, 4, dtype=torch.int64)}, tmp_path / "ints.pth")
    assert "ints.pth: video 'v' is not a [frames, width] tensor of float16" in \
        error_line(capsys, ["data", "pack", str(tmp_path / "ints.pth")])
    assert "nope.pth: features file not found" in error_line(capsys, ["data", "pack", str(tmp_path / "nope.pth")])
    assert "ends in .safetensors" in \
        error_line(capsys, ["data", "pack", str(tmp_path / "ints.pth"), "--output", str(tmp_path / "x.pt")])


def test_merge_refuses_parts_that_disagree(tmp_path, capsys):
    a, b, c, d = (tmp_path / f"{n}.safetensors" for n in "abcd")
    record = {"encoder": "clip", "model_type": "clip", "feature_dim": 768, "fps": 1.0}
    store.write_store(a, features(768, torch.float16, frames=(2, 3)), encoder=record)
    store.write_store(b, {"w": torch.zeros(2, 512, dtype=torch.float16)})
    store.write_store(c, {"x": torch.zeros(1, 768, dtype=torch.float16)}, encoder={**record, "fps": 3.0})
    store.write_store(d, {"v0": torch.zeros(2, 768, dtype=torch.float16)}, encoder=record)
    merged = str(tmp_path / "m.safetensors")

    def refused(*parts):
        return error_line(capsys, ["data", "pack", "--merge", *map(str, parts), "--output", merged])

    assert "b.safetensors: 512-d torch.float16 features, but" in refused(a, b)
    assert "c.safetensors: made with another encoder than" in refused(a, c) and "(they differ in fps)" in refused(a, c)
    assert "d.safetensors: video 'v0' is also in" in refused(a, d)
    assert not (tmp_path / "m.safetensors").exists()
    # The same frames twice (a merge that was interrupted after writing, say) are fine.
    assert merge([a, a], tmp_path / "m.safetensors") == 2


# ---------------------------------------------------------------------------- atomic writes
def test_a_killed_pack_leaves_no_store_a_reader_would_take(tmp_path):
    pth = tmp_path / "clipvitl14.pth"
    feats = features(768, torch.float16)
    torch.save(feats, pth)
    env = {**os.environ, "FLIPVQA_CRASH_AT": "write:1"}  # SIGKILL after the data is written, before the rename
    done = subprocess.run([sys.executable, "-m", "flipvqa", "data", "pack", str(pth)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9
    assert [p.name.endswith(".tmp") for p in tmp_path.iterdir() if p.name.startswith(".")] == [True]
    assert not pth.with_suffix(".safetensors").exists()
    assert isinstance(load_features(pth), dict)  # the leftover temporary file is not taken
    pack(pth)
    assert all(same(load_features(pth)[k], v) for k, v in feats.items())


def test_a_width_error_names_the_store_that_was_read(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(case_dir("nextqa") / "data", data)
    pth = data / "nextqa" / "clipvitl14.pth"
    torch.save({k: v[:, :512] for k, v in torch.load(pth).items()}, pth)
    pack(pth)
    flags = case_flags("nextqa", resume=case_dir("nextqa") / "checkpoint.pth", output_dir=tmp_path / "out")
    flags[flags.index("--data_path") + 1] = str(data)
    assert main(["-q", "eval", *flags]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the note on training-only flags
    assert line.startswith("flipvqa: error: ") and "clipvitl14.safetensors: the features are 512-d" in line
    assert "takes 768-d" in line, line
