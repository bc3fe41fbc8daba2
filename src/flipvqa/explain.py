"""The ``flipvqa ask --explain`` picture: the question, a row of the video's frames, how much the
chosen answer's tokens attend to each frame slot, and the ranked choices with their probabilities.

Drawn with matplotlib's object API, rendered by Agg: no pyplot, so no backend is switched, no
window opens and no figure stays registered or open after a call (a web server can call it)::

    png = render_explanation(answer, question, thumbnails, max_feats, slot_times=times)
    draw_explanation(Path("why.png"), answer, question, thumbnails, max_feats)
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np

from .quiet import quiet_import

quiet_import("matplotlib.font_manager")  # its one-time font-cache note stays out of the output
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from .data.records import slot_sources
from .io import write_atomic


class Answer(Protocol):
    """What the picture shows of an answer: :class:`flipvqa.ask.Answer` (typed here so that the
    dependencies point one way: the ask command imports this module, never the reverse)."""

    choice: str
    index: int
    ranked: list[tuple[str, float, float]]
    frame_attention: list[float]

DPI = 100
CHOSEN, OTHER = "#2e8b57", "#9dbcdc"  # the chosen answer's bar, the other choices'
FRAME, TOP, PAD, PAD_EDGE = "#e8955a", "#b5451b", "#d9d9d9", "#8c8c8c"  # attention bars
PLACEHOLDER, PLACEHOLDER_EDGE = "#eef3fa", "#7f9fc4"  # a slot with features but no picture
ROTATE_ABOVE = 12  # slots: above this many, the per-slot labels are written vertically
PROBABILITY = "bar: probability = softmax over the choices of minus their mean cross-entropy (CE)"


def draw_explanation(path: Path, answer: "Answer", question: str, thumbnails: Sequence, max_feats: int, *,
                     slot_times: Optional[Sequence[Optional[float]]] = None,
                     slot_labels: Optional[Sequence[str]] = None, layer_name: str = "last layer",
                     n_layers: Optional[int] = None) -> None:
    """Write :func:`render_explanation`'s PNG to ``path`` (atomically)."""
    data = render_explanation(answer, question, thumbnails, max_feats, slot_times=slot_times,
                              slot_labels=slot_labels, layer_name=layer_name, n_layers=n_layers)
    write_atomic(path, lambda f: f.write(data))


def render_explanation(answer: "Answer", question: str, thumbnails: Sequence, max_feats: int, *,
                       slot_times: Optional[Sequence[Optional[float]]] = None,
                       slot_labels: Optional[Sequence[str]] = None, layer_name: str = "last layer",
                       n_layers: Optional[int] = None) -> bytes:
    """The explanation picture as PNG bytes.

    ``thumbnails``: per slot a uint8 HxWx3 frame or None (a padding slot), or empty when the video
    came as features (a placeholder per slot, named by ``slot_labels`` or "slot j").
    ``slot_times``: seconds into the video per slot (None: padding). ``layer_name`` and
    ``n_layers`` say which layer ``answer.frame_attention`` was read from."""
    slots = _slots(answer, thumbnails, max(int(max_feats), 1), slot_times, slot_labels)
    layer = layer_name if n_layers is None else f"{layer_name} of {n_layers}"
    fig = _figure(answer, question, slots, layer)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# ---------------------------------------------------------------------------- what each slot holds
@dataclass
class _Slot:
    padding: bool
    when: str  # "t = 3 s", "frame 3", "slot 3" or "padding"
    image: Optional[np.ndarray]  # the thumbnail, None without one
    name: str  # the placeholder's text when there are no pictures


def _slots(answer: "Answer", thumbnails: Sequence, n: int, times: Optional[Sequence], labels: Optional[Sequence]
           ) -> list[_Slot]:
    """A slot is padding when a None thumbnail or a None time says so, or, without thumbnails, when
    it comes after the video's last frame (``answer.n_frames``, through :func:`slot_sources`)."""
    sources = slot_sources(answer.n_frames, n) if answer.n_frames > 0 else [-1] * n
    out = []
    for j in range(n):
        image = thumbnails[j] if thumbnails and j < len(thumbnails) else None
        t = times[j] if times is not None and j < len(times) else None
        after_end = image is None if thumbnails else sources[j] is None
        padding = after_end or (times is not None and t is None)
        if padding:
            when = "padding"
        elif t is not None:
            when = seconds(float(t))
        else:
            when = f"frame {sources[j]}" if sources[j] is not None and sources[j] >= 0 else f"slot {j}"
        name = str(labels[j]) if labels is not None and j < len(labels) else f"slot {j}"
        out.append(_Slot(padding, when, None if image is None else _small(np.asarray(image)), name))
    return out


def seconds(t: float) -> str:
    """"t = 3 s", "t = 2.5 s", "t = 1:05"."""
    if t >= 60:
        m, s = divmod(int(round(t)), 60)
        return f"t = {m}:{s:02d}"
    return f"t = {t:.0f} s" if abs(t - round(t)) < 0.05 else f"t = {t:.1f} s"


def _small(image: np.ndarray, most: int = 192) -> np.ndarray:
    """A thumbnail at most ``most`` pixels a side (every k-th pixel), RGB."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    step = max(1, math.ceil(max(image.shape[:2]) / most))
    return image[::step, ::step]


# ---------------------------------------------------------------------------- layout
def _figure(answer: "Answer", question: str, slots: list[_Slot], layer: str) -> Figure:
    n = len(slots)
    rotate = n > ROTATE_ABOVE
    slot_in = min(max(9.0 / n, 0.5), 1.4)  # inches per slot
    width = max(10.0, n * slot_in + 3.2)  # + the y labels on the left, the legend on the right
    per_in = n / (width - 2.8)  # data units per inch along x, about
    image_w = min(0.9, 1.5 * per_in)  # a frame at most 1.5 inches wide
    images = [s.image for s in slots if s.image is not None]
    ratio = images[0].shape[0] / images[0].shape[1] if images else (1.6 if rotate else 0.75)
    image_h = image_w * min(max(ratio, 0.4), 2.0)
    frames_box = image_h / per_in + 0.1  # inches, about (the true width is known once laid out)
    frames_in = frames_box + (0.8 if rotate else 0.35) + 0.35  # + the labels under them, the title

    choices, lines = _choice_labels(answer, width)
    choices_in = len(choices) * (0.3 if lines == 1 else 0.44) + 1.0
    title = choice_label(f"Q: {question}", int(width * 7.5), lines=4).split("\n")
    attention_box, attention_in = 1.9, 3.3 if rotate else 2.8
    height = 0.3 * len(title) + 0.25 + frames_in + attention_in + choices_in + 0.45  # + the legend

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    fig.suptitle("\n".join(title), fontsize=13, fontweight="bold", linespacing=1.15)
    top, bottom = fig.subfigures(2, 1, height_ratios=[frames_in + attention_in, choices_in + 0.45])
    grid = top.add_gridspec(2, 1, height_ratios=[frames_box, attention_box])
    ax_frames, ax_attention = top.add_subplot(grid[0]), top.add_subplot(grid[1])
    best = _draw_attention(ax_attention, answer.frame_attention, slots, layer, rotate, width, per_in)
    _draw_frames(ax_frames, slots, image_w, image_h, rotate, best, per_in)
    _draw_choices(bottom, answer, choices, width)
    fig.draw_without_rendering()  # lays the figure out: the frame row's true size is known
    box = ax_frames.get_window_extent()
    fits = n * box.height / max(box.width, 1.0)  # data units along y at x's scale
    pad = 0.05 * per_in
    if fits < image_h + 2 * pad:  # a shorter row than foreseen: smaller frames, still over their bars
        scale = (fits - 2 * pad) / image_h
        ax_frames.clear()
        _draw_frames(ax_frames, slots, image_w * scale, image_h * scale, rotate, best, per_in)
    ax_frames.set_ylim(-pad, max(fits, image_h + 2 * pad) - pad)  # the frames at their own aspect
    return fig


# ---------------------------------------------------------------------------- the frame row
def _draw_frames(ax, slots: list[_Slot], w: float, h: float, rotate: bool, best: Optional[int],
                 per_in: float) -> None:
    """One picture (or placeholder, or hatched grey padding box) per slot, its time under it."""
    n = len(slots)
    chars = max(5, int((h if rotate else w) / per_in / 0.075))  # 8-point characters along the box
    for j, s in enumerate(slots):
        left = j - w / 2
        if s.padding:
            ax.add_patch(Rectangle((left, 0), w, h, facecolor=PAD, edgecolor=PAD_EDGE, hatch="///", lw=1))
        elif s.image is not None:
            ax.imshow(s.image, extent=(left, left + w, 0, h), interpolation="antialiased", aspect="auto")
        else:
            ax.add_patch(Rectangle((left, 0), w, h, facecolor=PLACEHOLDER, edgecolor=PLACEHOLDER_EDGE, lw=1))
            ax.text(j, h / 2, choice_label(s.name, chars, 2 if rotate else 3), ha="center", va="center",
                    fontsize=8, rotation=90 if rotate else 0, linespacing=1.0)
        if j == best:  # the most attended frame, framed in its bar's colour
            ax.add_patch(Rectangle((left, 0), w, h, facecolor="none", edgecolor=TOP, lw=2.5))
        ax.annotate(s.when, (j, 0), xycoords=("data", "axes fraction"), xytext=(0, -3), textcoords="offset points",
                    ha="center", va="top", fontsize=8, rotation=90 if rotate else 0,
                    color="#555555" if s.padding else "black", fontstyle="italic" if s.padding else "normal")
    ax.set_xlim(-0.5, n - 0.5)  # as the bars' axes: each frame over its bar
    ax.set_axis_off()
    features_only = all(s.image is None for s in slots)
    what = "features only, no pictures: each box names its slot" if features_only else "the sampled frames"
    held = sum(not s.padding for s in slots)
    held = ("it holds a frame" if n == 1 else f"all {n} hold a frame") if held == n else f"{held} of {n} hold a frame, the rest are padding"
    ax.set_title(f"Frame slots ({what}; {held})", fontsize=10, loc="left")


# ---------------------------------------------------------------------------- attention bars
def attention_limits(values: Sequence[float], headroom: float = 0.12) -> tuple[float, float]:
    """The y range that shows the differences: from near the smallest value (0 when that is close
    anyway) to above the largest, ``headroom`` of the range left for the values written there."""
    if not values or max(values) <= 0:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    span = hi - lo
    bottom = lo - 0.35 * span
    if span <= 1e-9 * hi or bottom < 0.3 * hi:  # all equal, or differences that show from 0 anyway
        bottom = 0.0
    return bottom, (hi - headroom * bottom) / (1 - headroom) + 1e-12


def value_decimals(values: Sequence[float]) -> int:
    """Decimals (1 to 3) that tell the values (in percent) apart."""
    span = max(values) - min(values) if values else 0.0
    return 1 if span <= 0 else min(max(math.ceil(-math.log10(span)) + 1, 1), 3)


def _draw_attention(ax, attention: Sequence[float], slots: list[_Slot], layer: str, rotate: bool,
                    width: float, per_in: float) -> Optional[int]:
    """The bars; returns the most attended frame slot (None without attention)."""
    n = len(slots)
    ax.set_xticks(range(n), [f"{j} \u00b7 {s.when.removeprefix('t = ')}" if rotate else f"slot {j}\n{s.when}"
                             for j, s in enumerate(slots)],
                  rotation=90 if rotate else 0, fontsize=8)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("video slot and the time of its frame in the video")
    head = f"Attention of the chosen answer's tokens to each frame slot \u2014 {layer}"
    values = [100 * float(a) for a in list(attention)[:n]]
    if not values or max(values) <= 0:
        ax.set_title(head, fontsize=10, loc="left")
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no attention recorded (ask with explain=True)", transform=ax.transAxes,
                ha="center", va="center", color="#555555")
        return None
    values += [0.0] * (n - len(values))
    real = [j for j in range(n) if not slots[j].padding]
    best = max(real, key=lambda j: values[j]) if real else None
    colours = [PAD if slots[j].padding else TOP if j == best else FRAME for j in range(n)]
    bars = ax.bar(range(n), values, width=min(0.8, 1.2 * per_in), color=colours, edgecolor=[PAD_EDGE if s.padding else "none"
                                                                       for s in slots])
    for bar, s in zip(bars, slots):
        if s.padding:
            bar.set_hatch("///")
    bottom, top = attention_limits(values, 0.24 if rotate else 0.12)
    ax.set_ylim(bottom, top)
    d = value_decimals(values)
    for j, v in enumerate(values):
        ax.annotate(f"{v:.{d}f}%", (j, v), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=7 if rotate else 8, rotation=90 if rotate else 0)
    ax.set_ylabel("attention of the answer tokens\n(share, %)" + ("" if bottom == 0 else
                                                                  f"\naxis starts at {bottom:.{d}f}%"))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    together = f"all {n} slots together get" if n > 1 else "the one slot gets"
    note = (f"mean over heads and answer tokens; {together} {sum(values):.1f}% of the attention, "
            "the rest goes to the other tokens of the prompt")
    ax.set_title("\n".join([head, *textwrap.wrap(note, int(width * 11))]), fontsize=10, loc="left")
    handles = [Patch(facecolor=TOP, label="most attended frame")] if best is not None else []
    if len(real) > 1:
        handles.append(Patch(facecolor=FRAME, label="other frame slots"))
    if len(real) < n:
        handles.append(Patch(facecolor=PAD, edgecolor=PAD_EDGE, hatch="///", label="padding slot (no frame)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return best


# ---------------------------------------------------------------------------- ranked choices
def choice_label(text: str, chars: int, lines: int = 2) -> str:
    """``text`` wrapped to ``chars`` a line, at most ``lines`` lines, cut with an ellipsis."""
    wrapped = textwrap.wrap(" ".join(str(text).split()), chars) or ["(empty)"]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:chars - 1].rstrip() + "\u2026"
    return "\n".join(wrapped)


def _choice_labels(answer: "Answer", width: float) -> tuple[list[str], int]:
    chars = min(max(int(width * 4.5), 36), 70)
    labels = [f"{rank}. " + choice_label(c, chars) for rank, (c, _, _) in enumerate(answer.ranked, 1)]
    return labels, max((label.count("\n") + 1 for label in labels), default=1)


def _draw_choices(fig, answer: "Answer", labels: list[str], width: float) -> None:
    """Horizontal bars of the probabilities (%), best on top, the chosen answer highlighted."""
    ax = fig.add_subplot()
    ranked = answer.ranked
    chosen = next((i for i, (c, _, _) in enumerate(ranked) if c == answer.choice), 0)
    probs = [100 * p for _, p, _ in ranked]
    d = value_decimals(probs)
    ax.barh(range(len(ranked)), probs, height=0.7, color=[CHOSEN if i == chosen else OTHER for i in range(len(ranked))])
    ax.set_yticks(range(len(ranked)), labels, fontsize=9)
    ax.get_yticklabels()[chosen].set_fontweight("bold")
    ax.set_ylim(len(ranked) - 0.5, -0.5)  # best on top, no empty rows
    for i, (p, (_, _, ce)) in enumerate(zip(probs, ranked)):
        shown = f"{p:.{d}f}%" if p >= 10 ** -d or p == 0 else f"<{10 ** -d:g}%"
        ax.annotate(f"{shown}   CE {ce:.3f}", (p, i), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=8.5, fontweight="bold" if i == chosen else "normal")
    axes_in = width * 0.5  # about what the bars get beside their labels
    ax.set_xlim(0, max(max(probs, default=0), 1e-9) / max(1 - 1.4 / axes_in, 0.5))
    ax.set_xlabel("probability (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"The {len(ranked)} choices ranked by probability (best on top)", fontsize=10, loc="left")
    handles = [Patch(facecolor=CHOSEN, label="chosen answer"), Patch(facecolor=OTHER, label="other choices"),
               Line2D([], [], ls="none", label=PROBABILITY)]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
