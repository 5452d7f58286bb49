"""Load, size and normalise training images exactly as DiffSynth-Studio's `ImageCropAndResize` does.

DiffSynth (`diffsynth/core/data/operators.py`) picks the target size, then resizes to cover it and centre-crops:

* fixed `height`/`width`: the target is exactly that size;
* dynamic (`max_pixels`): images larger than `max_pixels` are shrunk by `sqrt(w*h / max_pixels)` with `int()`,
  never enlarged; both sides are then floored to multiples of the division factor (16 = VAE 8 x patch 2);
* resize: `scale = max(tw/w, th/h)`, bilinear to `(round(h*scale), round(w*scale))`, centre crop with
  torchvision's anchor `int(round((H - th) / 2))`; pixels map to `x * 2/255 - 1`.

torchvision is not a dependency here, so its two PIL calls are written out (its `resize` on a PIL image is
`Image.resize(..., BILINEAR)`, and returns the image unchanged when the size already matches). One addition:
images are EXIF-transposed, so phone photos are not trained on their side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DistilleryError

DEFAULT_MAX_PIXELS = 1024 * 1024  # DiffSynth's training default
_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Resolution:
    """How images are sized: fixed `height`x`width`, or dynamic up to `max_pixels`, sides multiples of `factor`."""

    height: int | None = None
    width: int | None = None
    max_pixels: int | None = None
    factor: int = 16

    def __post_init__(self):
        if not isinstance(self.factor, int) or self.factor < 1:
            raise DistilleryError("factor", self.factor, "must be a positive integer.",
                                  "use 16 (VAE factor 8 x patch size 2) or the codec's spatial factor x patch size.")
        if (self.height is None) != (self.width is None):
            raise DistilleryError("height/width", (self.height, self.width), "give both or neither.",
                                  "set both for a fixed size, or neither (and max_pixels) for dynamic resolution.")
        if self.height is not None:
            for name, value in (("height", self.height), ("width", self.width)):
                if not isinstance(value, int) or value < self.factor or value % self.factor:
                    near = max(1, round(value / self.factor)) * self.factor if isinstance(value, int) else 512
                    raise DistilleryError(name, value, f"must be a positive multiple of {self.factor}.",
                                          f"use e.g. {near}.")
        else:
            if self.max_pixels is None:
                object.__setattr__(self, "max_pixels", DEFAULT_MAX_PIXELS)
            if not isinstance(self.max_pixels, int) or self.max_pixels < self.factor ** 2:
                raise DistilleryError("max_pixels", self.max_pixels, f"must be an integer >= {self.factor ** 2}.",
                                      "use e.g. 1048576 (1024x1024).")

    @property
    def fixed(self) -> bool:
        return self.height is not None

    def key(self) -> dict:
        """What the cache keys on: every setting that changes the pixels that reach the codec."""
        return {"height": self.height, "width": self.width, "max_pixels": None if self.fixed else self.max_pixels,
                "factor": self.factor}

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """Target (height, width) for an image of `width` x `height` (DiffSynth's `get_height_width`)."""
        if self.fixed:
            return self.height, self.width
        if width * height > self.max_pixels:
            scale = (width * height / self.max_pixels) ** 0.5
            height, width = int(height / scale), int(width / scale)
        return height // self.factor * self.factor, width // self.factor * self.factor


def _open(path: str | os.PathLike, where: str) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DistilleryError(f"{where}, image", str(path), "the file does not exist.",
                              "check the path relative to the dataset's base folder.") from None
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise DistilleryError(f"{where}, image", str(path), f"not a readable image ({exc}).",
                              "replace the file with a valid PNG/JPEG/WebP, or remove the row.") from exc


def load_image(path: str | os.PathLike, where: str | None = None) -> Image.Image:
    """The image as RGB, EXIF-transposed and fully decoded (a truncated file fails here, naming the row)."""
    where = where or os.path.basename(path)
    image = _open(path, where)
    try:
        with image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data shows up on decode
        raise DistilleryError(f"{where}, image", str(path), f"the image data is damaged ({exc}).",
                              "replace the file with a valid image, or remove the row.") from exc


def check_image(path: str | os.PathLike, where: str | None = None) -> None:
    load_image(path, where)


def image_size(path: str | os.PathLike, where: str | None = None) -> tuple[int, int]:
    """(width, height) after EXIF transposition, read from the header without decoding the pixels."""
    where = where or os.path.basename(path)
    with _open(path, where) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, exactly as exif_transpose does
            orientation = None
    return (height, width) if orientation in _ROTATED else (width, height)


def crop_and_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize to cover (height, width) bilinearly, then centre-crop: DiffSynth's `crop_and_resize`."""
    w, h = image.size
    scale = max(width / w, height / h)
    size = (round(w * scale), round(h * scale))
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    top = int(round((h - height) / 2.0))
    left = int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 -> [3, H, W] float32 in [-1, 1], as DiffSynth's `preprocess_image` (x * 2/255 - 1)."""
    array = np.array(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * (2 / 255) - 1


def prepare_image(source: str | os.PathLike | Image.Image, resolution: Resolution,
                  where: str | None = None) -> tuple[torch.Tensor, bool]:
    """Load, size and normalise one image: ([3, H, W] in [-1, 1], whether its pixels were rescaled)."""
    image = source if isinstance(source, Image.Image) else load_image(source, where)
    width, height = image.size
    th, tw = resolution.size_for(width, height)
    if th < resolution.factor or tw < resolution.factor:
        raise DistilleryError(f"{where or 'image'}, image", f"{width}x{height}",
                              f"too small: sides are floored to multiples of {resolution.factor}.",
                              f"use images of at least {resolution.factor}x{resolution.factor} pixels.")
    rescaled = (th, tw) != (height, width)
    return to_tensor(crop_and_resize(image, th, tw)), rescaled
