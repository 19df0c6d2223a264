"""Charts and Markdown tables: tick maths, pixel placement of data, gaps, determinism, table text."""

from __future__ import annotations

import io
import math
import random

import pytest
from PIL import Image

from zeroshot_kd.charts import (PALETTE, bar_chart, format_number, line_chart, log_ticks, markdown_table,
                                nice_ticks, png_bytes, save_png)


def test_nice_ticks_known_ranges():
    assert nice_ticks(0, 7.3) == [0, 2, 4, 6, 8]
    assert nice_ticks(-1.2, 3.4) == [-2, -1, 0, 1, 2, 3, 4]
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.parametrize("seed", range(20))
def test_nice_ticks_cover_the_range_with_round_equal_steps(seed):
    rng = random.Random(seed)
    lo = rng.uniform(-1000, 1000) * 10 ** rng.randint(-4, 2)
    hi = lo + rng.uniform(1e-3, 10) * 10 ** rng.randint(-3, 3)
    ticks = nice_ticks(lo, hi, max_ticks=6)
    assert ticks[0] <= lo + 1e-9 * abs(lo) and ticks[-1] >= hi - 1e-9 * abs(hi)
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    step = steps[0]
    assert all(math.isclose(s, step, rel_tol=1e-6) for s in steps)
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5, 10))
    assert len(ticks) <= 8


def test_log_ticks():
    assert log_ticks(0.03, 200) == pytest.approx([0.01, 0.1, 1, 10, 100, 1000])
    assert log_ticks(5, 5) == pytest.approx([1, 10])
    wide = log_ticks(1e-6, 1e6)  # 12 decades -> every second decade
    assert wide == pytest.approx([10.0 ** e for e in range(-6, 7, 2)])
    with pytest.raises(ValueError):
        log_ticks(0, 1)


def test_format_number():
    assert format_number(0.0) == "0"
    assert format_number(0.123456) == "0.123"
    assert format_number(1.5e-5) == "1.50e-05"
    assert format_number(12345.0) == "1.23e+04"
    assert format_number(float("nan")) == "-"
    assert format_number(None) == "-"


def _rgb(img: Image.Image, x: float, y: float) -> tuple[int, int, int]:
    return img.getpixel((round(x), round(y)))


def test_line_chart_places_points_where_the_axis_says_log_and_linear():
    cats = [f"layer{i}" for i in range(6)]
    a = [0.02, 0.05, 0.3, 1.0, 4.0, 20.0]
    b = [5.0, 3.0, None, 2.0, 1.5, 0.8]  # a gap in the middle
    img, ax = line_chart({"a": a, "b": b}, cats, title="t", y_label="y", x_label="x", log_y=True)
    assert img.mode == "RGB"
    # The range covers the data in whole decades.
    assert ax.y_min == pytest.approx(0.01) and ax.y_max == pytest.approx(100)
    for i, v in enumerate(a):
        # Independent mapping: categories at slot centres, log10 linear in pixels.
        x = ax.left + (i + 0.5) * (ax.right - ax.left) / 6
        y = ax.bottom - (math.log10(v) - math.log10(0.01)) / (math.log10(100) - math.log10(0.01)) * (ax.bottom - ax.top)
        assert (ax.x_px(i), ax.y_px(v)) == pytest.approx((x, y))
        assert _rgb(img, x, y) == PALETTE[0]
    for i, v in enumerate(b):
        if v is not None:
            assert _rgb(img, ax.x_px(i), ax.y_px(v)) == PALETTE[1]
    # The gap: nothing of series b's colour in the column of category 2 inside the plot box.
    column = [img.getpixel((round(ax.x_px(2)), y)) for y in range(ax.top + 1, ax.bottom)]
    assert PALETTE[1] not in column

    img2, ax2 = line_chart({"a": [1.0, 3.0, 2.0]}, ["p", "q", "r"])
    assert ax2.y_min == 0 and ax2.y_max == pytest.approx(3.0)
    y = ax2.bottom - 2.0 / 3.0 * (ax2.bottom - ax2.top)
    assert ax2.y_px(2.0) == pytest.approx(y)
    assert _rgb(img2, ax2.x_px(2), y) == PALETTE[0]


def test_bar_chart_bar_heights():
    img, ax = bar_chart({"s0": [1.0, 4.0], "s1": [2.0, 0.0]}, ["c0", "c1"], y_max=5.0)
    assert ax.y_min == 0 and ax.y_max == 5.0
    slot = (ax.right - ax.left) / 2
    bar_w = (slot - 6) / 2
    for j, vals in enumerate([[1.0, 4.0], [2.0, 0.0]]):
        for i, v in enumerate(vals):
            x = ax.left + i * slot + 3 + (j + 0.5) * bar_w
            top = ax.bottom - v / 5.0 * (ax.bottom - ax.top)
            above = _rgb(img, x, top - 4)
            assert above != PALETTE[j]
            if v > 0:
                assert _rgb(img, x, (top + ax.bottom) / 2) == PALETTE[j]


def test_png_is_deterministic_and_saved_atomically(tmp_path):
    img, _ = line_chart({"x": [1.0, 2.0]}, ["a", "b"], title="same")
    data = png_bytes(img)
    again, _ = line_chart({"x": [1.0, 2.0]}, ["a", "b"], title="same")
    assert png_bytes(again) == data
    path = tmp_path / "c.png"
    save_png(img, path)
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]
    assert Image.open(io.BytesIO(data)).size == img.size


def test_chart_input_errors():
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        line_chart({"a": [1.0, 2.0]}, ["x", "y", "z"])
    with pytest.raises(ValueError):
        bar_chart({}, ["x"])


def test_markdown_table():
    text = markdown_table(["name", "score", "n"], [["a|b", 0.123456, 3], ["c", None, 40]])
    assert text == ("| name | score | n |\n"
                    "|:---|---:|---:|\n"
                    "| a\\|b | 0.123 | 3 |\n"
                    "| c | - | 40 |")
    assert markdown_table(["x"], [["y"]], align="c").splitlines()[1] == "|:---:|"
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        markdown_table(["a", "b", "c"], [[1, 2]])
