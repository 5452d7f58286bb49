"""Loss charts and image grids drawn with PIL (ComfyUI ships PIL but not matplotlib; a chart must not add a dependency).

Diffusion losses are very noisy (they depend on the sampled sigma), so the raw points are drawn faint and an
exponential moving average on top, as DiffSynth's maintainers advise reading them.

Text is laid out from measured boxes, never from fixed offsets: every label is placed where it does not cover
another, and a label longer than its room is wrapped or shortened with an ellipsis.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

_BG, _GRID, _AXIS, _RAW, _SMOOTH, _LR, _TEXT = ((255, 255, 255), (230, 230, 230), (90, 90, 90), (160, 190, 230),
                                              (20, 80, 200), (230, 120, 20), (40, 40, 40))
_EVAL = (20, 150, 60)
_AUX = (170, 60, 170)  # a second series (a loss's own, e.g. DMD's fake-score loss), smoothed like the loss
GRID_FONT_SIZE = 13

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive)


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (the TensorBoard smoothing)."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** i))
    return out


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


# ----------------------------------------------------------------------------------------------------------
# Measured text

def font(size: int = GRID_FONT_SIZE):
    """Pillow's own TrueType font (Aileron, bundled since Pillow 10.1) at `size`; the bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def _gap(fnt) -> int:
    # Aileron's space is 2-3 px at chart sizes, which reads as no space at all ("purple crosson yellow"):
    # words are drawn one by one with a third of an em between them.
    return max(round(fnt.getlength(" ")), round(getattr(fnt, "size", 10) * 0.33), 2)


def text_width(text: str, fnt) -> int:
    """The width `draw_text` gives `text` (words plus the word gaps)."""
    words = text.split(" ")
    return round(sum(fnt.getlength(w) for w in words)) + _gap(fnt) * (len(words) - 1)


def line_height(fnt) -> int:
    return fnt.getbbox("Agy|")[3] + 1


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fnt, fill) -> Box | None:
    """Draw `text` with visible word gaps; returns the inked box (None for blank text)."""
    x, y = round(xy[0]), round(xy[1])
    box = None
    for word in text.split(" "):
        if word:
            draw.text((x, y), word, fill=fill, font=fnt)
            b = draw.textbbox((x, y), word, font=fnt)
            box = b if box is None else (min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]), max(box[3], b[3]))
        x += round(fnt.getlength(word)) + _gap(fnt)
    return box


def _ellipsis(fnt) -> str:
    return "\u2026" if isinstance(fnt, ImageFont.FreeTypeFont) else "..."


def fit_text(text: str, fnt, max_width: int) -> str:
    """`text`, shortened with an ellipsis if it is wider than `max_width`."""
    if text_width(text, fnt) <= max_width:
        return text
    dots = _ellipsis(fnt)
    lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(text[:mid].rstrip() + dots, fnt) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + dots if lo or text_width(dots, fnt) <= max_width else ""


def wrap_text(text: str, fnt, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines, each at most `max_width` wide (the last one ellipsised
    when words are left over)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", fnt) <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:  # the rest is wider than a line (else the wrap had kept it on one): ellipsised
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [fit_text(line, fnt, max_width) for line in lines]


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ----------------------------------------------------------------------------------------------------------
# Loss chart

def loss_chart(steps: list[int], losses: list[float], *, lrs: list[float] | None = None, title: str = "loss",
               width: int = 640, height: int = 360, smoothing: float = 0.9, log_scale: bool = False,
               evals: list[tuple[int, float]] | None = None, aux: list[tuple[int, float]] | None = None,
               aux_label: str = "aux") -> Image.Image:
    """A PNG-ready chart of a loss history (and the learning rate, scaled to the right axis; held-out
    evaluation losses as green dots; `aux`, a second loss such as DMD's fake score, as a purple line)."""
    return render_loss_chart(steps, losses, lrs=lrs, title=title, width=width, height=height, smoothing=smoothing,
                             log_scale=log_scale, evals=evals, aux=aux, aux_label=aux_label)[0]


def render_loss_chart(steps: list[int], losses: list[float], *, lrs: list[float] | None = None, title: str = "loss",
                      width: int = 640, height: int = 360, smoothing: float = 0.9, log_scale: bool = False,
                      evals: list[tuple[int, float]] | None = None, aux: list[tuple[int, float]] | None = None,
                      aux_label: str = "aux") -> tuple[Image.Image, dict[str, list[Box]]]:
    """`loss_chart`, plus the box of everything it drew by kind ("title", "stats", "plot", "y_ticks", "x_ticks",
    "axis", "lr"), so the layout can be checked."""
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    fnt = font(max(10, min(16, round(min(width / 50, height / 28)))))
    line = line_height(fnt)
    pad = max(4, line // 3)
    boxes: dict[str, list[Box]] = {k: [] for k in ("title", "stats", "plot", "y_ticks", "x_ticks", "axis", "lr")}

    def put(kind: str, xy, text: str, fill) -> None:
        box = draw_text(draw, xy, text, fnt, fill)
        if box is not None:
            boxes[kind].append(box)

    def fits(box: Box) -> bool:  # inside the image and clear of everything drawn so far
        return (box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height
                and not any(_overlaps(box, b) for bs in boxes.values() for b in bs))

    title = fit_text(title, fnt, width - 2 * pad)
    put("title", (pad, pad), title, _TEXT)
    points = [(s, v) for s, v in zip(steps, losses) if v is not None and math.isfinite(v) and (v > 0 or not log_scale)]
    if not points:
        put("stats", (pad, pad + line + pad), "no data yet", _TEXT)
        return img, boxes
    evals = [(s, v) for s, v in (evals or []) if math.isfinite(v) and (v > 0 or not log_scale)]
    aux = [(s, v) for s, v in (aux or []) if v is not None and math.isfinite(v) and (v > 0 or not log_scale)]
    xs = [p[0] for p in points]
    ys = [math.log10(p[1]) if log_scale else p[1] for p in points]
    eys = [math.log10(v) if log_scale else v for _, v in evals]
    aux_ys = [math.log10(v) if log_scale else v for _, v in aux]
    aux_smooth = ema(aux_ys, smoothing) if len(aux_ys) > 2 else aux_ys
    smooth = ema(ys, smoothing) if len(ys) > 2 else ys

    # the stats: right-aligned on the title's line where they fit beside it, else on lines of their own
    stats = [(f"last {points[-1][1]:.4g}", _SMOOTH),
             (f"smoothed {(10 ** smooth[-1]) if log_scale else smooth[-1]:.4g}", _SMOOTH)]
    if evals:
        stats.append((f"eval {evals[-1][1]:.4g}", _EVAL))
    if aux:
        stats.append((f"{aux_label} {aux[-1][1]:.4g}", _AUX))
    sep = 3 * _gap(fnt)
    stats_w = sum(text_width(t, fnt) for t, _ in stats) + sep * (len(stats) - 1)
    title_w = text_width(title, fnt) if title else 0
    if title_w + 4 * sep + stats_w <= width - 2 * pad:
        x, y = width - pad - stats_w, pad
    else:
        x, y = pad, pad + line + pad // 2
    for text, colour in stats:
        if x > pad and x + text_width(text, fnt) > width - pad:  # wrap onto the next line
            x, y = pad, y + line
        text = fit_text(text, fnt, width - pad - x)
        put("stats", (x, y), text, colour)
        x += text_width(text, fnt) + sep
    header = max(b[3] for bs in boxes.values() for b in bs)

    x0 = min(xs + [s for s, _ in evals + aux])
    x1 = max(xs + [s for s, _ in evals + aux])
    x1 = x1 if x1 > x0 else x0 + 1
    lo, hi = min(ys + eys + aux_ys), max(ys + eys + aux_ys)
    margin = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - margin, hi + margin
    y_ticks = [(t, f"{10 ** t:.3g}" if log_scale else f"{t:.3g}") for t in _nice_ticks(lo, hi)]
    lr_points = [(s, v) for s, v in zip(steps, lrs or []) if v is not None]
    lr_hi = max((v for _, v in lr_points), default=0.0) or 1.0
    lr_text = ["lr", f"{lr_hi:.1e}"] if len(lr_points) > 1 else []

    left = pad + max(text_width(t, fnt) for _, t in y_ticks) + pad
    right = width - pad - (max(text_width(t, fnt) for t in lr_text) + pad if lr_text else 0)
    top = header + pad + line // 2  # half a line of room for the top tick label, centred on its grid line
    bottom = height - pad - 2 * line - pad
    if right - left < 8 or bottom - top < 8:  # too small for a plot: the header is all there is
        return img, boxes

    def px(x, y, ylo=lo, yhi=hi):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - ylo) / (yhi - ylo) * (bottom - top))

    ink_top = fnt.getbbox("0")[1]  # the digits' ink starts this far below the drawing position
    ink_h = fnt.getbbox("0")[3] - ink_top
    for t, label in y_ticks:
        _, y = px(x0, t)
        draw.line([(left, y), (right, y)], fill=_GRID)
        w = text_width(label, fnt)
        pos = (left - pad - w, y - ink_top - ink_h / 2)
        box = draw.textbbox((round(pos[0]), round(pos[1])), label, font=fnt)
        if fits(box):
            put("y_ticks", pos, label, _TEXT)
    axis_y = bottom + pad // 2
    for t in _nice_ticks(x0, x1):
        x, _ = px(t, lo)
        draw.line([(x, top), (x, bottom)], fill=_GRID)
        label = f"{int(t)}"
        pos = (min(max(x - text_width(label, fnt) / 2, 0), width - text_width(label, fnt)), axis_y)
        box = draw.textbbox((round(pos[0]), round(pos[1])), label, font=fnt)
        if fits((box[0] - pad, box[1], box[2] + pad, box[3])):  # a little air between neighbours
            put("x_ticks", pos, label, _TEXT)
    name_w = text_width("step", fnt)
    put("axis", (right - name_w, axis_y + line), "step", _TEXT)
    draw.rectangle([left, top, right, bottom], outline=_AXIS)
    boxes["plot"].append((left, top, right + 1, bottom + 1))

    if len(points) > 1:
        draw.line([px(x, y) for x, y in zip(xs, ys)], fill=_RAW, width=1)
        draw.line([px(x, y) for x, y in zip(xs, smooth)], fill=_SMOOTH, width=2)
    else:
        x, y = px(xs[0], ys[0])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_SMOOTH)
    if len(aux) > 1:
        draw.line([px(s, y) for (s, _), y in zip(aux, aux_smooth)], fill=_AUX, width=2)
    for (s, _), y in zip(evals, eys):
        x, y = px(s, y)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_EVAL)
    if lr_text:
        draw.line([px(s, v, 0.0, lr_hi * 1.05) for s, v in lr_points], fill=_LR, width=1)
        for i, text in enumerate(lr_text):
            put("lr", (right + pad, top + i * line), text, _LR)
    return img, boxes


# ----------------------------------------------------------------------------------------------------------
# Image grid

def image_grid(rows: list[list[Image.Image]], *, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, scale: int | None = None) -> Image.Image:
    """Images in a labelled grid (e.g. one row per prompt/seed, columns teacher | student).

    Small images (the 32 px synthetic shapes) are upscaled with nearest-neighbour so they stay legible. Column
    labels wrap onto two lines within their column; row labels onto as many lines as the row has room for, in
    a label column at most 260 px wide; what still does not fit ends with an ellipsis.
    """
    cells = [im for row in rows for im in row if im is not None]
    if not cells:
        return Image.new("RGB", (64, 64), _BG)
    cw = max(im.width for im in cells)
    ch = max(im.height for im in cells)
    scale = scale or max(1, 128 // max(cw, ch))
    cw, ch = cw * scale, ch * scale
    fnt = font(GRID_FONT_SIZE)
    line, gap = line_height(fnt), 4
    label_w = 0
    if row_labels:
        label_w = min(260, max(text_width(s, fnt) for s in row_labels) + 2 * gap)
    row_lines = [wrap_text(s, fnt, label_w - 2 * gap, max(1, ch // line)) for s in row_labels or []]
    col_lines = [wrap_text(s, fnt, cw, 2) for s in col_labels or []]
    label_h = max((len(ls) for ls in col_lines), default=0) * line + (gap if col_lines else 0)
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncols * (cw + gap) + gap, label_h + len(rows) * (ch + gap) + gap), _BG)
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(col_lines):
        for i, text in enumerate(lines):
            draw_text(draw, (label_w + gap + c * (cw + gap), 2 + i * line), text, fnt, _TEXT)
    for r, row in enumerate(rows):
        y = label_h + gap + r * (ch + gap)
        if row_labels:
            lines = row_lines[r]
            for i, text in enumerate(lines):
                draw_text(draw, (gap, y + (ch - len(lines) * line) // 2 + i * line), text, fnt, _TEXT)
        for c, im in enumerate(row):
            if im is not None:
                grid.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST), (label_w + gap + c * (cw + gap), y))
    return grid
