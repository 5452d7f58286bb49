"""The built-in dataset: coloured shapes on coloured backgrounds, with captions, generated from a seed.

"a red circle on a blue background": small enough that a tiny DiT learns it on a CPU in minutes, and checkable
without a model: `classify_image` reads shape colour, shape and background back from any image, so the
benchmark can score whether a student draws what the prompt asked. The vocabulary (`COLOURS`, `SHAPES`) is
public for that reason. Images are drawn without anti-aliasing, so clean images hold exactly two palette colours.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import DistilleryError
from ..formats import atomic_output, atomic_write_text

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 50), "blue": (30, 60, 210), "yellow": (245, 215, 30),
    "purple": (130, 40, 170), "orange": (245, 130, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
MIN_SIZE = 16


@dataclass
class ShapeSample:
    image: Image.Image
    prompt: str
    shape: str
    colour: str
    background: str
    box: tuple[int, int, int, int]   # inclusive pixel bounds x0, y0, x1, y1 of the shape


def caption(shape: str, colour: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on {'an' if background[0] in 'aeiou' else 'a'} {background} background"


def parse_caption(prompt: str) -> tuple[str, str, str] | None:
    """(colour, shape, background) named by a caption of this vocabulary, or None when it names none."""
    words = prompt.lower().replace(",", " ").split()
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    if len(colours) != 2 or len(shapes) != 1:
        return None
    return colours[0], shapes[0], colours[1]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        arm_x, arm_y = (x1 - x0 + 1) // 3, (y1 - y0 + 1) // 3
        draw.rectangle((x0, y0 + arm_y, x1, y1 - arm_y), fill=fill)
        draw.rectangle((x0 + arm_x, y0, x1 - arm_x, y1), fill=fill)
    else:
        raise DistilleryError("shape", shape, "not in the vocabulary.", f"use one of {list(SHAPES)}.")


def render(shape: str, colour: str, background: str, size: int = 32,
           box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """One image; `box` defaults to a centred square of 60% of the side."""
    for name, value in (("colour", colour), ("background", background)):
        if value not in COLOURS:
            raise DistilleryError(name, value, "not in the vocabulary.", f"use one of {list(COLOURS)}.")
    if box is None:
        side = round(size * 0.6)
        x0 = (size - side) // 2
        box = (x0, x0, x0 + side - 1, x0 + side - 1)
    image = Image.new("RGB", (size, size), COLOURS[background])
    _draw(ImageDraw.Draw(image), shape, box, COLOURS[colour])
    return image


def generate_samples(n: int, *, seed: int = 0, size: int = 32, jitter: bool = False) -> list[ShapeSample]:
    """`n` samples, the same for the same arguments. Every (shape, colour, background) combination appears
    once before any repeats. By default the shape is centred at 60% of the side: the embedded default task,
    which a 0.85M-parameter AAADiT learns on CPU in minutes (>90% colour, shape and background accuracy);
    `jitter=True` varies its size (40-75% of the side) and position, a much harder task."""
    if not isinstance(n, int) or n < 1:
        raise DistilleryError("n", n, "must be an integer >= 1.", "ask for at least one image.")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise DistilleryError("size", size, f"must be an integer >= {MIN_SIZE}.", "use 32 (the default) or more.")
    rng = random.Random(seed)
    combos = [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b]
    samples, order = [], []
    for _ in range(n):
        if not order:
            order = combos[:]
            rng.shuffle(order)
        shape, colour, background = order.pop()
        margin = 2  # the border must stay background: the classifier reads the background there
        if jitter:
            side = rng.randint(round(size * 0.4), round(size * 0.75))
            x0 = rng.randint(margin, size - margin - side)
            y0 = rng.randint(margin, size - margin - side)
        else:
            side = round(size * 0.6)
            x0 = y0 = (size - side) // 2
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        samples.append(ShapeSample(render(shape, colour, background, size, box), caption(shape, colour, background),
                                   shape, colour, background, box))
    return samples


def write_dataset(folder: str | os.PathLike, n: int = 256, *, seed: int = 0, size: int = 32, jitter: bool = False,
                  overwrite: bool = False) -> Path:
    """Write `n` PNGs and a DiffSynth-format `metadata.csv` (image,prompt + shape,colour,background columns,
    which DiffSynth passes through and our benchmark uses as ground truth). Returns the metadata path."""
    folder = Path(folder)
    meta = folder / "metadata.csv"
    if meta.exists() and not overwrite:
        raise DistilleryError("out", str(folder), "already holds a metadata.csv.",
                              "choose an empty folder, or pass overwrite=True to replace the dataset.")
    samples = generate_samples(n, seed=seed, size=size, jitter=jitter)
    digits = max(5, len(str(n - 1)))
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["image", "prompt", "shape", "colour", "background"])
    for i, sample in enumerate(samples):
        name = f"{i:0{digits}d}.png"
        with atomic_output(folder / name) as tmp:
            sample.image.save(tmp, format="PNG")
        writer.writerow([name, sample.prompt, sample.shape, sample.colour, sample.background])
    atomic_write_text(meta, rows.getvalue())  # last: a folder with metadata.csv is complete
    return meta


# ----------------------------------------------------------------------------------------------------------
# Reading an image back

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour (RGB distance) of every pixel."""
    return ((pixels[..., None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)


def classify_image(image) -> tuple[str | None, str | None, str]:
    """(shape colour, shape, background colour) of an image, None for the shape parts if it shows no shape.

    * background: the most common nearest-palette colour of the border pixels;
    * shape colour: the most common nearest-palette colour among the other pixels;
    * mask: pixels nearer to the shape colour than to the background colour (a blurred edge splits at the
      midpoint, so the outline survives blur and JPEG); its bounding box ignores specks, i.e. mask pixels with
      fewer than two mask neighbours;
    * shape: each vocabulary shape is drawn into that box and the one overlapping the mask best (intersection
      over union) wins. For the shapes here that is the fill-ratio/symmetry test made exact: a square fills its
      box, a circle ~79%, a triangle and a diamond half (told apart by top-bottom symmetry), a cross ~56% with
      empty corners.

    Accepts a PIL image, an HxWx3 uint8 array, or a [3,H,W] tensor in [-1, 1].
    """
    pixels = _as_rgb_array(image)
    labels = _nearest_colour(pixels)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(_PALETTE)).argmax())
    inside = labels[labels != background]
    if inside.size == 0:
        return None, None, _PALETTE_NAMES[background]
    colour = int(np.bincount(inside, minlength=len(_PALETTE)).argmax())
    mask = ((pixels - _PALETTE[colour]) ** 2).sum(-1) < ((pixels - _PALETTE[background]) ** 2).sum(-1)
    height, width = mask.shape
    padded = np.pad(mask, 1).astype(np.int32)
    neighbours = sum(padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - mask
    core = mask & (neighbours >= 2)
    ys, xs = np.nonzero(core if core.any() else mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    best, best_iou = None, -1.0
    for shape in SHAPES:
        template = Image.new("1", (width, height), 0)
        _draw(ImageDraw.Draw(template), shape, box, 1)
        drawn = np.array(template, dtype=bool)
        iou = (drawn & mask).sum() / max(1, (drawn | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return _PALETTE_NAMES[colour], best, _PALETTE_NAMES[background]


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3 and t.shape[0] == 3:
            return ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise DistilleryError("image", tuple(array.shape), "not an RGB image.",
                              "pass a PIL image, an HxWx3 uint8 array or a [3,H,W] tensor in [-1, 1].")
    return array
