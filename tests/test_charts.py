"""Loss charts and image grids: nothing drawn on top of anything else, labels keep their spaces, and a label too
long for its room is shortened or wrapped instead of running into the images. With Pillow's TrueType font and
with the bitmap font it falls back to."""

import itertools
import math

import pytest
from PIL import Image, ImageDraw, ImageFont

from dit_distillery import charts
from dit_distillery.charts import fit_text, image_grid, render_loss_chart, text_width, wrap_text


@pytest.fixture(params=["truetype", "bitmap"])
def font_kind(request, monkeypatch):
    if request.param == "bitmap":  # what Pillow gives without FreeType
        monkeypatch.setattr(charts.ImageFont, "load_default", lambda size=None: ImageFont.load_default_imagefont())
        assert not isinstance(charts.font(13), ImageFont.FreeTypeFont)
    return request.param


def _history(n=300):
    steps = list(range(1, n + 1))
    losses = [0.5 * math.exp(-s / 80) + 0.05 + 0.05 * math.sin(s * 1.7) ** 2 for s in steps]
    return steps, losses, [min(1.0, s / 20) * 2e-3 for s in steps], [(s, 0.3 * math.exp(-s / 80)) for s in (0, 100, 200)]


@pytest.mark.parametrize("title", ["loss", "student_lora: direct_distill loss", "a very long run name " * 12])
@pytest.mark.parametrize("size", [(640, 360), (320, 200), (200, 120)])
def test_chart_text_and_plot_never_overlap(font_kind, title, size):
    steps, losses, lrs, evals = _history()
    img, boxes = render_loss_chart(steps, losses, lrs=lrs, evals=evals, title=title, width=size[0], height=size[1])
    assert img.size == size and boxes["title"] and boxes["plot"]
    assert len(boxes["stats"]) == 3  # last, smoothed, eval: all drawn
    drawn = [(kind, b) for kind, bs in boxes.items() for b in bs]
    for _, (l, t, r, b) in drawn:
        assert 0 <= l < r <= size[0] and 0 <= t < b <= size[1]
    for (ka, a), (kb, b) in itertools.combinations(drawn, 2):
        assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (ka, a, kb, b)
    if text_width(title, charts.font(10)) > size[0]:  # the long title was shortened, not clipped at the edge
        assert boxes["title"][0][2] < size[0]
    # the title's ink is the text colour only: no stats (blue) pixels drawn into it
    title_px = img.crop(boxes["title"][0]).getdata()
    assert not any(b > 150 and r < 100 for r, g, b in title_px)


def test_chart_without_data_says_so():
    img, boxes = render_loss_chart([], [], title="empty")
    assert boxes["stats"] and not boxes["plot"] and img.getbbox()


def test_rendered_label_width_grows_with_its_spaces(font_kind):
    fnt = charts.font(charts.GRID_FONT_SIZE)

    def ink_width(text):
        img = Image.new("L", (400, 40), 0)
        box = charts.draw_text(ImageDraw.Draw(img), (2, 2), text, fnt, 255)
        assert img.getbbox()[2] == box[2]  # the box it reports is where the ink is
        return box[2] - box[0]

    # three spaces of at least 3 px each (the "purple crosson yellow": about 2 px read as none)
    assert ink_width("purple cross on yellow") >= ink_width("purplecrossonyellow") + 9
    # and in a grid's row label
    cell = [[Image.new("RGB", (32, 32), (200, 40, 40))]]
    inked = []
    for label in ("purple cross on yellow", "purplecrossonyellow"):
        grid = image_grid(cell, row_labels=[label])
        left, right = _ink_columns(grid, (0, 0, grid.width - 128 - 8, grid.height))
        inked.append(right - left)
    assert inked[0] >= inked[1] + 9


def test_fit_and_wrap_measure_widths(font_kind):
    fnt = charts.font(13)
    long = "a red circle on a blue background, seed 12345, fifty steps"
    short = fit_text(long, fnt, 120)
    assert short != long and short.endswith(charts._ellipsis(fnt)) and text_width(short, fnt) <= 120
    assert fit_text("LoRA student", fnt, 400) == "LoRA student"
    lines = wrap_text(long, fnt, 120, 2)
    assert len(lines) == 2 and lines[0] in long and all(text_width(x, fnt) <= 120 for x in lines)
    assert lines[1].endswith(charts._ellipsis(fnt))
    assert wrap_text("teacher 50st cfg4", fnt, 400, 2) == ["teacher 50st cfg4"]


def _ink_columns(img, box):
    """x positions inside `box` holding any non-background pixel."""
    crop = img.crop(box).convert("L").point(lambda v: 255 if v < 250 else 0)
    bbox = crop.getbbox()
    return None if bbox is None else (box[0] + bbox[0], box[0] + bbox[2])


def test_labels_that_do_not_fit_stay_out_of_the_images(font_kind):
    colour = (30, 160, 60)
    rows = [[Image.new("RGB", (32, 32), colour), Image.new("RGB", (32, 32), colour)] for _ in range(2)]
    long_row = "a " + "verylongword" * 8 + " caption that goes on and on and on, " * 6
    grid = image_grid(rows, row_labels=[long_row, "red circle on blue"],
                      col_labels=["x" * 80, "teacher 50st cfg4 with a rather long column name"])
    cw, gap = 128, 4
    label_w = grid.width - 2 * (cw + gap) - gap
    assert label_w <= 260
    header = grid.height - 2 * (cw + gap) - gap
    # row labels stay in the label column
    ink = _ink_columns(grid, (0, header, grid.width, grid.height))
    assert ink is not None and all(
        _ink_columns(grid, (label_w, header + gap + r * (cw + gap), label_w + gap, header + (r + 1) * (cw + gap)))
        is None for r in range(2))
    # every cell is exactly its image
    for r, c in itertools.product(range(2), range(2)):
        x, y = label_w + gap + c * (cw + gap), header + gap + r * (cw + gap)
        assert set(grid.crop((x, y, x + cw, y + cw)).getdata()) == {colour}
    # each column label stays over its own column: the gutters between columns stay blank (glyphs may
    # overhang their origin by a pixel)
    assert _ink_columns(grid, (0, 0, label_w + gap - 1, header)) is None
    assert _ink_columns(grid, (label_w + gap, 0, label_w + gap + cw, header)) is not None  # (the x * 80 one)
    for c in range(2):
        x = label_w + gap + c * (cw + gap)
        assert _ink_columns(grid, (x + cw + 1, 0, min(grid.width, x + cw + gap - 1), header)) is None
