"""Loss charts drawn with PIL (ComfyUI ships PIL but not matplotlib; a chart must not add a dependency).

Diffusion losses are very noisy (they depend on the sampled sigma), so the raw points are drawn faint and an
exponential moving average on top, as DiffSynth's maintainers advise reading them.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

_BG, _GRID, _AXIS, _RAW, _SMOOTH, _LR, _TEXT = ((255, 255, 255), (230, 230, 230), (90, 90, 90), (160, 190, 230),
                                              (20, 80, 200), (230, 120, 20), (40, 40, 40))
_EVAL = (20, 150, 60)


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


def loss_chart(steps: list[int], losses: list[float], *, lrs: list[float] | None = None, title: str = "loss",
               width: int = 640, height: int = 360, smoothing: float = 0.9, log_scale: bool = False,
               evals: list[tuple[int, float]] | None = None) -> Image.Image:
    """A PNG-ready chart of a loss history (and the learning rate, scaled to the right axis; held-out
    evaluation losses as green dots)."""
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, width - (56 if lrs else 16), 28, height - 36
    draw.text((left, 8), title, fill=_TEXT, font=font)
    points = [(s, v) for s, v in zip(steps, losses) if v is not None and math.isfinite(v) and (v > 0 or not log_scale)]
    if not points:
        draw.text((left, height // 2), "no data yet", fill=_TEXT, font=font)
        return img
    evals = [(s, v) for s, v in (evals or []) if math.isfinite(v) and (v > 0 or not log_scale)]
    xs = [p[0] for p in points]
    ys = [math.log10(p[1]) if log_scale else p[1] for p in points]
    eys = [math.log10(v) if log_scale else v for _, v in evals]
    smooth = ema(ys, smoothing) if len(ys) > 2 else ys
    x0 = min(xs + [s for s, _ in evals])
    x1 = max(xs + [s for s, _ in evals])
    x1 = x1 if x1 > x0 else x0 + 1
    lo, hi = min(ys + eys), max(ys + eys)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad

    def px(x, y, ylo=lo, yhi=hi):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - ylo) / (yhi - ylo) * (bottom - top))

    for t in _nice_ticks(lo, hi):
        _, y = px(x0, t)
        draw.line([(left, y), (right, y)], fill=_GRID)
        label = f"{10 ** t:.3g}" if log_scale else f"{t:.3g}"
        draw.text((4, y - 6), label, fill=_TEXT, font=font)
    for t in _nice_ticks(x0, x1):
        x, _ = px(t, lo)
        draw.line([(x, top), (x, bottom)], fill=_GRID)
        draw.text((x - 10, bottom + 6), f"{int(t)}", fill=_TEXT, font=font)
    draw.rectangle([left, top, right, bottom], outline=_AXIS)
    draw.text((right - 30, bottom + 20), "step", fill=_TEXT, font=font)

    if len(points) > 1:
        draw.line([px(x, y) for x, y in zip(xs, ys)], fill=_RAW, width=1)
        draw.line([px(x, y) for x, y in zip(xs, smooth)], fill=_SMOOTH, width=2)
    else:
        x, y = px(xs[0], ys[0])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_SMOOTH)

    for (s, _), y in zip(evals, eys):
        x, y = px(s, y)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_EVAL)
    if evals:
        draw.text((left + 330, 8), f"eval {evals[-1][1]:.4g}", fill=_EVAL, font=font)

    if lrs:
        lr_points = [(s, v) for s, v in zip(steps, lrs) if v is not None]
        if len(lr_points) > 1:
            lr_hi = max(v for _, v in lr_points) or 1.0
            draw.line([px(s, v, 0.0, lr_hi * 1.05) for s, v in lr_points], fill=_LR, width=1)
            draw.text((right + 4, top), f"lr\n{lr_hi:.1e}", fill=_LR, font=font)
    draw.text((left + 60, 8), f"last {losses[-1]:.4g}   smoothed {(10 ** smooth[-1]) if log_scale else smooth[-1]:.4g}",
              fill=_SMOOTH, font=font)
    return img


def image_grid(rows: list[list[Image.Image]], *, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, scale: int | None = None) -> Image.Image:
    """Images in a labelled grid (e.g. one row per prompt/seed, columns teacher | student).

    Small images (the 32 px synthetic shapes) are upscaled with nearest-neighbour so they stay legible.
    """
    cells = [im for row in rows for im in row if im is not None]
    if not cells:
        return Image.new("RGB", (64, 64), _BG)
    cw = max(im.width for im in cells)
    ch = max(im.height for im in cells)
    scale = scale or max(1, 128 // max(cw, ch))
    cw, ch = cw * scale, ch * scale
    font = ImageFont.load_default()
    label_w = 0 if not row_labels else min(260, 6 * max(len(s) for s in row_labels) + 8)
    label_h = 0 if not col_labels else 16
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncols * (cw + 4) + 4, label_h + len(rows) * (ch + 4) + 4), _BG)
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels or []):
        draw.text((label_w + 4 + c * (cw + 4), 2), text, fill=_TEXT, font=font)
    for r, row in enumerate(rows):
        y = label_h + 4 + r * (ch + 4)
        if row_labels:
            draw.text((4, y + ch // 2 - 6), row_labels[r][: label_w // 6], fill=_TEXT, font=font)
        for c, im in enumerate(row):
            if im is not None:
                grid.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST), (label_w + 4 + c * (cw + 4), y))
    return grid
