"""Small charts drawn with Pillow (no matplotlib) and Markdown tables, for reports and benchmarks.

Two chart kinds cover what zkd reports need: a **line chart** (one line per series over ordered categories,
e.g. the per-layer divergence profile of several datasets) and a **grouped bar chart** (one bar per series in
each category). Both have axes with "nice" ticks, an optional log10 y-axis for values that span decades, a
legend, and rotated category labels, and both return the :class:`Axes` that maps data to pixels, so callers
(and tests) can annotate or check the picture.

Example::

    img, axes = line_chart({"train": [0.1, 0.2], "noise": [3.0, 9.0]}, ["bn1", "bn2"], title="KL", log_y=True)
    save_png(img, "profile.png")
    print(markdown_table(["name", "score"], [["train", 0.15], ["noise", 6.0]]))

Missing values (``None``, NaN, and non-positive values on a log axis) are left out: lines break there and bars
are not drawn, so a gap in the picture always means "no value", never zero.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from .io import atomic_write_bytes

__all__ = [
    "MARKERS",
    "PALETTE",
    "Axes",
    "bar_chart",
    "format_number",
    "line_chart",
    "log_ticks",
    "markdown_table",
    "nice_ticks",
    "png_bytes",
    "save_png",
]

# Okabe-Ito (colour-blind safe; its pale yellow last), then Tableau colours for more series. Line charts also
# cycle marker shapes, so series stay apart in grey scale and beyond the palette.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
    (0, 0, 0), (140, 86, 75), (127, 127, 127), (188, 189, 34), (148, 103, 189), (240, 228, 66),
)
MARKERS = ("circle", "square", "triangle", "diamond")
_BACKGROUND = (255, 255, 255)
_AXIS = (40, 40, 40)
_GRID = (225, 225, 225)
_TEXT = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (no system fonts needed); scalable where Pillow has FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering ``[lo, hi]``.

    The first tick is <= ``lo`` and the last >= ``hi``, so the ticks also give the axis range.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, max_ticks - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    k = 0
    while True:
        t = first + k * step
        ticks.append(round(t, max(0, 3 - math.floor(math.log10(step)))))
        if t >= hi - 1e-9 * step:
            break
        k += 1
    return ticks


def log_ticks(lo: float, hi: float, max_ticks: int = 9) -> list[float]:
    """Powers of ten covering ``[lo, hi]`` (both > 0): the first <= ``lo``, the last >= ``hi``, at least two.

    When the range spans more than ``max_ticks - 1`` decades, every k-th decade is kept.
    """
    if lo <= 0 or hi <= 0:
        raise ValueError(f"log ticks need a positive range, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    a = math.floor(math.log10(lo) + 1e-12)
    b = max(a + 1, math.ceil(math.log10(hi) - 1e-12))
    step = max(1, math.ceil((b - a) / max(1, max_ticks - 1)))
    return [10.0 ** e for e in range(a, b + step, step) if e - step < b]


def format_number(v: float, digits: int = 3) -> str:
    """Compact human formatting: ``0``, ``0.25``, ``1.5e-05``, ``1.2e+04``, ``3``; ``-`` for missing values."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.{max(0, digits - 1)}e}"
    return f"{v:.{digits}g}"


@dataclass(frozen=True)
class Axes:
    """The plot box of a chart (pixels) and the data range it shows; maps data coordinates to pixels.

    Categories ``0 .. n-1`` sit at the centres of ``n`` equal slots across the box.
    """

    left: int
    top: int
    right: int
    bottom: int
    num_categories: int
    y_min: float
    y_max: float
    log_y: bool

    def x_px(self, index: float) -> float:
        """Horizontal pixel of the centre of category ``index``."""
        slot = (self.right - self.left) / max(1, self.num_categories)
        return self.left + (index + 0.5) * slot

    def y_px(self, value: float) -> float:
        """Vertical pixel of ``value`` (top of the box = ``y_max``)."""
        if self.log_y:
            lo, hi, v = math.log10(self.y_min), math.log10(self.y_max), math.log10(value)
        else:
            lo, hi, v = self.y_min, self.y_max, value
        return self.bottom - (v - lo) / (hi - lo) * (self.bottom - self.top)


def _valid(v: Any, log_y: bool) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log_y)


def _paste_rotated(img: Image.Image, xy: tuple[int, int], text: str, font: Any, fill: tuple[int, int, int]) -> None:
    """Draw ``text`` rotated 90 degrees counter-clockwise with its top-left corner at ``xy``."""
    w, h = _text_size(font, text)
    left, top, _, _ = font.getbbox(text)
    mask = Image.new("L", (w + 2, h + 2), 0)
    ImageDraw.Draw(mask).text((1 - left, 1 - top), text, font=font, fill=255)
    mask = mask.rotate(90, expand=True)
    img.paste(Image.new("RGB", mask.size, fill), xy, mask)


def _y_range(values: list[float], log_y: bool, y_min: float | None,
             y_max: float | None) -> tuple[list[float], float, float]:
    if log_y:
        pos = [v for v in values if v > 0]
        lo = y_min if y_min is not None else (min(pos) if pos else 1.0)
        hi = y_max if y_max is not None else (max(pos) if pos else 10.0)
        ticks = log_ticks(lo, max(hi, lo))
        if len(ticks) <= 3:  # one or two decades: also label 2x and 5x
            ticks = [t * m for t in ticks[:-1] for m in (1, 2, 5)] + ticks[-1:]
        return ticks, ticks[0], ticks[-1]
    lo = y_min if y_min is not None else min([0.0] + values)
    hi = y_max if y_max is not None else max([0.0] + values)
    ticks = nice_ticks(lo, hi)
    return ticks, ticks[0], ticks[-1]


def _frame(
    series: Mapping[str, Sequence[float | None]],
    categories: Sequence[str],
    title: str,
    y_label: str,
    x_label: str,
    log_y: bool,
    y_min: float | None,
    y_max: float | None,
    slot_px: int,
    height: int,
    font_size: int,
    lines: bool = False,
) -> tuple[Image.Image, ImageDraw.ImageDraw, Axes, list[tuple[int, int, int]]]:
    """Canvas, axes, grid, tick labels, category labels, title and legend; returns the colour of each series."""
    if not categories:
        raise ValueError("a chart needs at least one category")
    if not series:
        raise ValueError("a chart needs at least one series")
    for name, vals in series.items():
        if len(vals) != len(categories):
            raise ValueError(f"series {name!r} has {len(vals)} values for {len(categories)} categories")
    font, small, big = _font(font_size), _font(max(8, font_size - 2)), _font(font_size + 3)
    values = [float(v) for vals in series.values() for v in vals if _valid(v, log_y)]
    ticks, lo, hi = _y_range(values, log_y, y_min, y_max)
    tick_labels = [f"{t:g}" for t in ticks]
    tick_w = max(_text_size(small, t)[0] for t in tick_labels)
    cat_w = max(_text_size(small, c)[0] for c in categories)
    _, line_h = _text_size(font, "Hg")
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    legend_w = max(_text_size(font, n)[0] for n in series) + 34

    left = 18 + line_h + 8 + tick_w + 8
    top = 16 + (line_h + 12 if title else 0)
    plot_w = max(240, slot_px * len(categories))
    right = left + plot_w
    bottom = top + height
    width = right + 24 + legend_w + 16
    total_h = bottom + 10 + cat_w + 8 + (line_h + 10 if x_label else 0) + 8
    total_h = max(total_h, top + len(series) * (line_h + 8) + 20)

    img = Image.new("RGB", (width, total_h), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    axes = Axes(left, top, right, bottom, len(categories), lo, hi, log_y)
    for t, label in zip(ticks, tick_labels):
        y = round(axes.y_px(t))
        draw.line([(left, y), (right, y)], fill=_GRID, width=1)
        draw.line([(left - 4, y), (left, y)], fill=_AXIS, width=1)
        tw, th = _text_size(small, label)
        bl, bt, _, _ = small.getbbox(label)
        draw.text((left - 7 - tw - bl, y - th / 2 - bt), label, font=small, fill=_TEXT)
    draw.rectangle([left, top, right, bottom], outline=_AXIS, width=1)
    for i, c in enumerate(categories):
        x = round(axes.x_px(i))
        draw.line([(x, bottom), (x, bottom + 4)], fill=_AXIS, width=1)
        w, h = _text_size(small, c)
        _paste_rotated(img, (x - (h + 2) // 2, bottom + 8 + (cat_w - w)), c, small, _TEXT)
    if title:
        tw, _ = _text_size(big, title)
        draw.text((max(4, left + (plot_w - tw) // 2), 10), title, font=big, fill=_TEXT)
    if y_label:
        w, _ = _text_size(font, y_label)
        _paste_rotated(img, (12, max(top, top + (height - w) // 2)), y_label, font, _TEXT)
    if x_label:
        w, _ = _text_size(font, x_label)
        draw.text((left + (plot_w - w) // 2, bottom + 10 + cat_w + 8), x_label, font=font, fill=_TEXT)
    lx, ly = right + 24, top + 4
    for k, (name, color) in enumerate(zip(series, colors)):
        cy = ly + line_h / 2
        if lines:
            draw.line([(lx, cy), (lx + 20, cy)], fill=color, width=2)
            _marker(draw, lx + 10, cy, MARKERS[k % len(MARKERS)], color)
        else:
            draw.rectangle([lx, round(cy) - 5, lx + 20, round(cy) + 5], fill=color)
        bl, bt, _, _ = font.getbbox(name)
        draw.text((lx + 28 - bl, ly - bt), name, font=font, fill=_TEXT)
        ly += line_h + 8
    return img, draw, axes, colors


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, shape: str, color: tuple[int, int, int],
            r: float = 3.5) -> None:
    """A filled marker centred on (x, y)."""
    if shape == "square":
        draw.rectangle([x - r + 0.5, y - r + 0.5, x + r - 0.5, y + r - 0.5], fill=color)
    elif shape == "triangle":
        draw.polygon([(x, y - r - 1), (x - r - 0.5, y + r - 0.5), (x + r + 0.5, y + r - 0.5)], fill=color)
    elif shape == "diamond":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=color)
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)


def line_chart(
    series: Mapping[str, Sequence[float | None]],
    categories: Sequence[str],
    title: str = "",
    y_label: str = "",
    x_label: str = "",
    log_y: bool = False,
    y_min: float | None = None,
    y_max: float | None = None,
    slot_px: int = 40,
    height: int = 320,
    font_size: int = 13,
) -> tuple[Image.Image, Axes]:
    """One line with point markers per series over ordered categories (e.g. layers in depth order).

    Args:
        series: name -> one value per category, drawn in insertion order with :data:`PALETTE` colours.
        categories: the x-axis labels (drawn rotated, so long layer names fit).
        title, y_label, x_label: captions; empty strings are left out.
        log_y: log10 y-axis with decade ticks (non-positive values become gaps).
        y_min, y_max: force the y range (otherwise it covers the data and 0 on a linear axis).
        slot_px: horizontal pixels per category; height: pixels of the plot box.
        font_size: pixel size of Pillow's bundled font.

    Returns:
        The RGB image and the :class:`Axes` that places data on it.
    """
    img, draw, axes, colors = _frame(series, categories, title, y_label, x_label, log_y, y_min, y_max, slot_px,
                                     height, font_size, lines=True)
    for k, (vals, color) in enumerate(zip(series.values(), colors)):
        run: list[tuple[float, float]] = []
        points: list[tuple[float, float]] = []
        for i, v in enumerate(list(vals) + [None]):
            if i < len(vals) and _valid(v, log_y):
                p = (axes.x_px(i), axes.y_px(float(v)))
                run.append(p)
                points.append(p)
            else:
                if len(run) > 1:
                    draw.line(run, fill=color, width=2, joint="curve")
                run = []
        for x, y in points:
            _marker(draw, x, y, MARKERS[k % len(MARKERS)], color)
    return img, axes


def bar_chart(
    series: Mapping[str, Sequence[float | None]],
    categories: Sequence[str],
    title: str = "",
    y_label: str = "",
    x_label: str = "",
    log_y: bool = False,
    y_min: float | None = None,
    y_max: float | None = None,
    slot_px: int | None = None,
    height: int = 320,
    font_size: int = 13,
) -> tuple[Image.Image, Axes]:
    """Grouped bars: in each category, one bar per series (same order and colours as the legend).

    Arguments as for :func:`line_chart`; ``slot_px`` defaults to 10 pixels per bar plus a gap. Bars grow from
    the bottom of the axis on a log scale and from zero on a linear one.
    """
    n = len(series)
    slot = slot_px if slot_px is not None else max(24, 10 * n + 12)
    img, draw, axes, colors = _frame(series, categories, title, y_label, x_label, log_y, y_min, y_max, slot,
                                     height, font_size)
    slot_w = (axes.right - axes.left) / len(categories)
    bar_w = max(1.0, (slot_w - 6) / max(1, n))
    base = axes.bottom if log_y else axes.y_px(min(max(0.0, axes.y_min), axes.y_max))
    for j, (vals, color) in enumerate(zip(series.values(), colors)):
        for i, v in enumerate(vals):
            if not _valid(v, log_y):
                continue
            x0 = axes.left + i * slot_w + 3 + j * bar_w
            y = axes.y_px(float(v))
            draw.rectangle([round(x0), round(min(y, base)), round(x0 + bar_w) - 1, round(max(y, base))], fill=color)
    return img, axes


def png_bytes(img: Image.Image) -> bytes:
    """Encode an image as PNG with fixed settings (same image, same bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    """Write an image as PNG atomically (temporary name, then rename)."""
    atomic_write_bytes(path, png_bytes(img))


def _cell(v: Any, digits: int) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) or (v is None):
        s = format_number(v, digits)
    else:
        s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None,
                   digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline).

    Args:
        headers: column titles.
        rows: cell values; floats go through :func:`format_number` (``None``/NaN -> ``-``), others through ``str``;
            ``|`` is escaped.
        align: one letter per column, ``l``/``r``/``c``; default: right for columns whose cells are all numbers,
            left otherwise.
        digits: significant digits for floats.
    """
    ncol = len(headers)
    for r in rows:
        if len(r) != ncol:
            raise ValueError(f"row {list(r)!r} has {len(r)} cells for {ncol} columns")
    if align is None:
        align = "".join(
            "r" if rows and all(isinstance(r[c], (int, float)) and not isinstance(r[c], bool) or r[c] is None
                                for r in rows) else "l"
            for c in range(ncol)
        )
    if len(align) != ncol or set(align) - set("lrc"):
        raise ValueError(f"align needs one of l/r/c per column ({ncol}), got {align!r}")
    rule = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_cell(h, digits) for h in headers) + " |",
             "|" + "|".join(rule[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(v, digits) for v in r) + " |" for r in rows]
    return "\n".join(lines)
