"""The ``ask --explain`` picture: a PNG that decodes, sized for its choices and slots, no figure
left open, and the helpers that make differences show."""

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from flipvqa.ask import Answer
from flipvqa.data.records import slot_sources
from flipvqa.explain import (attention_limits, choice_label, draw_explanation, render_explanation, seconds,
                             value_decimals)

WORDS = "the man in a red shirt picks up the cup and walks to the kitchen door while talking".split()


def make_answer(k: int, slots: int, n_frames: int, seed: int = 0) -> Answer:
    rng = np.random.default_rng(seed)
    ces = np.sort(rng.uniform(0.5, 3.0, k))
    probs = np.exp(-ces) / np.exp(-ces).sum()
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 25)))) + f" ({i})" for i in range(k)]
    ranked = [(t, float(p), float(c)) for t, p, c in zip(texts, probs, ces)]
    return Answer(texts[0], 3, ranked, list(rng.uniform(0.02, 0.035, slots)), n_frames)


def thumbnails(slots: int, n_frames: int, seed: int = 0) -> tuple[list, list]:
    """Random frames per slot (None for padding) and their times at 1 fps."""
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(n_frames)]
    sources = slot_sources(n_frames, slots)
    return [None if i is None else frames[i] for i in sources], [None if i is None else float(i) for i in sources]


def decode(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(autouse=True)
def no_figures_left():
    plt.close("all")
    yield
    assert plt.get_fignums() == []


@pytest.mark.parametrize("k", [2, 5, 26])
def test_png_with_frames_and_padding(tmp_path, k):
    answer = make_answer(k, 10, 6)
    thumbs, times = thumbnails(10, 6)
    path = tmp_path / "why.png"
    draw_explanation(path, answer, "Why did the man walk to the door?", thumbs, 10, slot_times=times, n_layers=32)
    image = decode(path.read_bytes())
    assert image.format == "PNG" and image.mode in ("RGB", "RGBA")
    width, height = image.size
    assert 640 <= width <= 2500 and 400 <= height <= 3500
    assert np.asarray(image.convert("L")).std() > 10  # something is drawn
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary file left


def test_height_grows_with_the_choices():
    thumbs, times = thumbnails(10, 6)
    heights = [decode(render_explanation(make_answer(k, 10, 6), "what happens first?", thumbs, 10,
                                         slot_times=times)).size[1] for k in (2, 5, 26)]
    assert heights[0] < heights[1] < heights[2]


def test_features_only_with_slot_labels():
    labels = ["cooking", "dancing", "playing guitar", "swimming"] * 2
    answer = make_answer(4, 8, 8)
    data = render_explanation(answer, "what is the person doing?", [], 8, slot_labels=labels,
                              layer_name="layer 31", n_layers=32)
    width, height = decode(data).size
    assert 640 <= width <= 2500 and 400 <= height <= 2500


@pytest.mark.parametrize("slots,n_frames", [(1, 1), (32, 20), (32, 100)])
def test_few_and_many_slots(slots, n_frames):
    thumbs, times = thumbnails(slots, n_frames)
    small = render_explanation(make_answer(3, slots, n_frames), "q?", thumbs, slots, slot_times=times)
    width, _ = decode(small).size
    assert 640 <= width <= 2500
    features = render_explanation(make_answer(3, slots, n_frames), "q?", [], slots)
    assert decode(features).size[0] == width


def test_draw_writes_what_render_returns(tmp_path):
    answer = make_answer(5, 4, 4)
    thumbs, times = thumbnails(4, 4)
    path = tmp_path / "sub" / "why.png"
    draw_explanation(path, answer, "why?", thumbs, 4, slot_times=times)
    drawn = np.asarray(decode(path.read_bytes()))
    rendered = np.asarray(decode(render_explanation(answer, "why?", thumbs, 4, slot_times=times)))
    assert drawn.shape == rendered.shape and (drawn == rendered).all()


def test_without_attention_and_with_odd_inputs():
    """No attention recorded, a grey thumbnail, a long question and choices, equal probabilities."""
    long = "word " * 200
    answer = Answer(long, 0, [(long, 0.5, 1.0), ("", 0.5, 1.0)], [], 2)
    gray = np.zeros((30, 40), dtype=np.uint8)
    decode(render_explanation(answer, long, [gray, None, None], 3))


def test_attention_axis_is_scaled_to_the_data():
    bottom, top = attention_limits([3.10, 3.12, 3.11, 3.13])
    assert 3.0 < bottom < 3.10 and 3.13 < top < 3.2  # the differences fill the axis
    assert attention_limits([1.0, 3.0, 2.0])[0] == 0  # already visible from 0
    assert attention_limits([2.0, 2.0])[0] == 0 and attention_limits([]) == (0.0, 1.0)
    assert attention_limits([0.0, 0.0]) == (0.0, 1.0)


def test_value_decimals_tell_values_apart():
    assert value_decimals([3.10, 3.13]) == 3
    assert value_decimals([2.0, 3.5]) == 1
    assert value_decimals([2.0, 2.0]) == 1
    values = [3.101, 3.112]
    assert len({f"{v:.{value_decimals(values)}f}" for v in values}) == 2


def test_choice_label_wraps_and_cuts():
    assert choice_label("to catch a bus", 40) == "to catch a bus"
    label = choice_label("a " * 100, 20)
    assert label.count("\n") == 1 and label.endswith("\u2026") and all(len(x) <= 20 for x in label.split("\n"))
    assert choice_label("x" * 100, 30, lines=1) == "x" * 29 + "\u2026"
    assert choice_label("  ", 30) == "(empty)"


def test_seconds():
    assert seconds(3.0) == "t = 3 s" and seconds(2.5) == "t = 2.5 s" and seconds(65) == "t = 1:05"
