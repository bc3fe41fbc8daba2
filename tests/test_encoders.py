"""``flipvqa extract-features`` with frame encoders other than CLIP: SigLIP (and SigLIP 2), the
sidecar that records the encoder, resuming, and unsupported models.

The models are tiny random ones built with transformers and saved into tmp folders; the videos and
the tiny CLIP come from test_features.py. Nothing touches the network.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("PIL")
transformers = pytest.importorskip("transformers")

from flipvqa.errors import FlipVQAError  # noqa: E402
from flipvqa.features import clip  # noqa: E402
from flipvqa.features.extract import extract_features, record_path  # noqa: E402
from flipvqa.features.video import iter_frames  # noqa: E402

import test_features  # noqa: E402
from test_features import colour_index, ffmpeg_rule, make_video  # noqa: E402

tiny_clip = test_features.tiny_clip  # the fixture, reused (an assignment: pyflakes sees it used)

WIDTH = 48  # the tiny SigLIP's hidden size: the width of its features
TOWER = {"hidden_size": WIDTH, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def save_siglip(folder: Path, processor_size: int | None = 32) -> Path:
    """A tiny random SiglipVisionModel (32 px, 8 px patches) with a processor config of
    ``processor_size`` px (none when None)."""
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(**TOWER, image_size=32, patch_size=8)
    transformers.SiglipVisionModel(config).save_pretrained(folder)
    if processor_size:
        size = {"height": processor_size, "width": processor_size}
        transformers.SiglipImageProcessor(size=size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_siglip(tmp_path_factory.mktemp("tiny_siglip"))


def raw_frames(path: Path, fps: float = 1) -> np.ndarray:
    return np.stack(list(iter_frames(path, fps, crop=False)))


def one_line(err: pytest.ExceptionInfo[FlipVQAError]) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


# --------------------------------------------------------------------------- SigLIP features


def test_siglip_features_match_a_direct_model_call(tmp_path: Path, tiny_siglip: Path) -> None:
    make_video(tmp_path / "wide.mp4", 75)  # 64x48, 3 s
    make_video(tmp_path / "tall.mp4", 110, size=(48, 64))  # 4.4 s: 4 frames
    output = tmp_path / "out" / "siglip.pth"
    # batch_size 3 splits videos across batches and mixes two videos in one batch.
    summary = extract_features([tmp_path], tiny_siglip, output, fps=1, batch_size=3, device="cpu")
    assert summary["extracted"] == 2 and summary["failed"] == []
    features = torch.load(output, weights_only=True)
    assert set(features) == {"wide", "tall"}
    processor = transformers.AutoImageProcessor.from_pretrained(tiny_siglip)
    model = transformers.SiglipVisionModel.from_pretrained(tiny_siglip).eval()
    for video_id, n, shape in [("wide", 3, (48, 64)), ("tall", 4, (64, 48))]:
        frames = raw_frames(tmp_path / f"{video_id}.mp4")
        # The same frames as CLIP's, but whole: the processor resizes them its own way.
        assert frames.shape == (n, *shape, 3)
        assert [colour_index(f) for f in frames] == ffmpeg_rule(75 if n == 3 else 110, 25, 1)
        pixels = processor(images=list(frames), return_tensors="pt").pixel_values
        assert pixels.shape == (n, 3, 32, 32)
        with torch.inference_mode():
            direct = model(pixel_values=pixels).pooler_output
        assert features[video_id].shape == (n, WIDTH) and features[video_id].dtype == torch.float16
        torch.testing.assert_close(features[video_id], direct.half(), rtol=2e-3, atol=2e-3)
    assert json.loads(record_path(output).read_text()) == {
        "encoder": str(tiny_siglip.resolve()),
        "model_type": "siglip_vision_model",
        "feature_dim": WIDTH,
        "fps": 1.0,
    }
    assert record_path(output).name == "siglip.pth.json" and not list(output.parent.glob("*.tmp"))


def test_siglip_without_processor_config_uses_siglip_defaults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from PIL import Image

    folder = save_siglip(tmp_path / "bare", processor_size=None)
    with caplog.at_level(logging.WARNING, logger="flipvqa.features.clip"):
        encoder = clip.load_encoder(folder, "cpu")
    assert "SigLIP's defaults" in caplog.text and encoder.feature_dim == WIDTH and not encoder.crop
    frames = raw_frames(make_video(tmp_path / "v.mp4", 50, noise=True))
    # The defaults longhand: the model's image_size square, bicubic, /255, mean 0.5, std 0.5.
    resized = [np.asarray(Image.fromarray(f).resize((32, 32), Image.Resampling.BICUBIC)) for f in frames]
    expected = (torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(encoder.prepare(frames)["pixel_values"], expected, rtol=0, atol=1e-5)


def test_full_siglip_folder_loads_its_vision_tower(tmp_path: Path) -> None:
    torch.manual_seed(0)
    text = {**TOWER, "num_hidden_layers": 1, "vocab_size": 99, "max_position_embeddings": 16}
    config = transformers.SiglipConfig(
        text_config=text, vision_config={**TOWER, "image_size": 32, "patch_size": 8}
    )
    full = transformers.SiglipModel(config).eval()
    full.save_pretrained(tmp_path)
    encoder = clip.load_encoder(tmp_path, "cpu")  # no processor config: the defaults
    assert encoder.model_type == "siglip" and encoder.feature_dim == WIDTH
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = full.get_image_features(pixel_values=pixels)
        expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    got = encoder.embed({"pixel_values": pixels}, torch.device("cpu"))
    torch.testing.assert_close(got, expected.half(), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not hasattr(transformers, "Siglip2VisionModel"), reason="transformers without SigLIP 2")
def test_siglip2_features_match_a_direct_model_call(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.Siglip2VisionConfig(**TOWER, patch_size=8, num_patches=16)
    transformers.Siglip2VisionModel(config).save_pretrained(tmp_path / "siglip2")
    video = make_video(tmp_path / "v.mp4", 75)
    output = tmp_path / "f.pth"
    extract_features([video], tmp_path / "siglip2", output, batch_size=2, device="cpu")
    processor = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)  # its defaults
    inputs = processor(images=list(raw_frames(video)), return_tensors="pt")
    model = transformers.Siglip2VisionModel.from_pretrained(tmp_path / "siglip2").eval()
    with torch.inference_mode():
        direct = model(**inputs).pooler_output
    got = torch.load(output, weights_only=True)["v"]
    assert got.shape == (3, WIDTH)
    torch.testing.assert_close(got, direct.half(), rtol=2e-3, atol=2e-3)
    assert json.loads(record_path(output).read_text())["model_type"] == "siglip2_vision_model"


def test_processor_that_does_not_fit_the_model_is_one_line(tmp_path: Path) -> None:
    folder = save_siglip(tmp_path / "misfit", processor_size=64)  # 64 px pixels for a 32 px model
    with pytest.raises(FlipVQAError) as err:
        clip.load_encoder(folder, "cpu")
    assert "does not fit the model" in one_line(err) and str(folder) in str(err.value)


# --------------------------------------------------------------------------- the sidecar and resuming


def test_resume_with_another_encoder_is_refused(
    tmp_path: Path, tiny_clip: Path, tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = [make_video(tmp_path / "a.mp4", 50)]
    output = tmp_path / "feats.pth"
    extract_features(videos, tiny_clip, output, device="cpu")
    record = json.loads(record_path(output).read_text())
    assert record == {"encoder": str(tiny_clip.resolve()), "model_type": "clip_vision_model",
                      "feature_dim": 768, "fps": 1.0}
    before = output.read_bytes()
    videos.append(make_video(tmp_path / "b.mp4", 50))
    for model, fps in [(tiny_siglip, 1), (tiny_clip, 3)]:
        with pytest.raises(FlipVQAError) as err:
            extract_features(videos, model, output, fps=fps, device="cpu")
        message = one_line(err)
        assert str(output) in message and "another --output" in message
        assert (str(tiny_siglip.resolve()) if fps == 1 else "fps 3.0") in message
    with pytest.raises(FlipVQAError):  # refused even with nothing left to extract
        extract_features(videos[:1], tiny_siglip, output, device="cpu")
    assert output.read_bytes() == before and json.loads(record_path(output).read_text()) == record
    monkeypatch.chdir(tiny_clip.parent)  # the same encoder, given by a relative path, resumes
    summary = extract_features(videos, tiny_clip.name, output, device="cpu")
    assert summary["extracted"] == 1 and summary["skipped_existing"] == 1


def test_output_without_sidecar_is_checked_by_width(
    tmp_path: Path, tiny_clip: Path, tiny_siglip: Path
) -> None:
    make_video(tmp_path / "b.mp4", 50)
    output = tmp_path / "released.pth"
    torch.save({"a": torch.zeros(3, 768, dtype=torch.float16)}, output)  # as the released features
    with pytest.raises(FlipVQAError) as err:
        extract_features([tmp_path / "b.mp4"], tiny_siglip, output, device="cpu")
    assert "768-d" in one_line(err) and f"{WIDTH}-d" in str(err.value)
    assert not record_path(output).exists()
    extract_features([tmp_path / "b.mp4"], tiny_clip, output, device="cpu")  # 768-d: it fits
    assert set(torch.load(output, weights_only=True)) == {"a", "b"}
    assert json.loads(record_path(output).read_text())["feature_dim"] == 768


def test_unsupported_model_type_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    bert.save_pretrained(folder)
    make_video(tmp_path / "v.mp4", 30)
    for call in (lambda: clip.load_encoder(folder, "cpu"),
                 lambda: extract_features([tmp_path / "v.mp4"], folder, tmp_path / "f.pth", device="cpu")):
        with pytest.raises(FlipVQAError) as err:
            call()
        message = one_line(err)
        assert str(folder) in message and "'bert'" in message
        assert re.search(r"clip, clip_vision_model, siglip, siglip_vision_model", message)
    assert not (tmp_path / "f.pth").exists() and not record_path(tmp_path / "f.pth").exists()


def test_cli_extracts_siglip_features(tmp_path: Path, tiny_siglip: Path) -> None:
    videos = [make_video(tmp_path / "one.mp4", 75), make_video(tmp_path / "two.mp4", 50, size=(48, 64))]
    output = tmp_path / "siglip.pth"
    options = {"--output": output, "--clip_model": tiny_siglip, "--device": "cpu"}
    flags = [str(word) for pair in options.items() for word in pair]
    done = subprocess.run([sys.executable, "-m", "flipvqa", "extract-features", *map(str, videos), *flags],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "extracted 2 videos, 0 already there, 0 failed" in done.stdout
    features = torch.load(output, weights_only=True)
    assert {k: tuple(v.shape) for k, v in features.items()} == {"one": (3, WIDTH), "two": (2, WIDTH)}
    assert json.loads(record_path(output).read_text())["feature_dim"] == WIDTH


def test_ask_reads_a_video_with_the_siglip_encoder(tmp_path: Path, tiny_siglip: Path) -> None:
    """flipvqa ask on a video file, with a checkpoint whose projection takes SigLIP's width: the
    features are extract-features' for the same video."""
    from flipvqa.ask import Answerer

    from conftest import REF, case_dir

    ckpt = torch.load(case_dir("nextqa") / "checkpoint.pth", weights_only=False)
    dim = ckpt["model"]["visual_proj.weight"].shape[0]
    ckpt["model"]["visual_proj.weight"] = torch.randn(dim, WIDTH, generator=torch.Generator().manual_seed(0))
    torch.save(ckpt, tmp_path / "siglip-ckpt.pth")
    video = make_video(tmp_path / "clip.mp4", 100)  # 4 s
    answerer = Answerer(tmp_path / "siglip-ckpt.pth", clip_model=str(tiny_siglip), device="cpu",
                        llama_model_path=str(REF / "llama"), model="tiny", adapter_layer=2, max_seq_len=128)
    features, frames = answerer.video_features(video)
    extract_features([video], tiny_siglip, tmp_path / "f.pth", fps=1, device="cpu")
    torch.testing.assert_close(features, torch.load(tmp_path / "f.pth")["clip"].float(), rtol=2e-3, atol=2e-3)
    assert features.shape == (4, WIDTH) and frames[0].shape == (48, 64, 3)  # whole frames: SigLIP resizes them
    answer = answerer.ask(video, "what happens", ["a dog runs", "a cat sleeps"], explain=True)
    assert answer.n_frames == 4 and len(answer.frame_attention) == 10
