"""Image sizing exactly as DiffSynth's ImageCropAndResize, EXIF transposition, [-1, 1] tensors."""

import numpy as np
import pytest
import torch
from PIL import Image

from dit_distillery.data import Resolution, crop_and_resize, load_image, prepare_image, to_tensor
from dit_distillery.data.images import image_size
from dit_distillery.errors import DistilleryError


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,res,expected", [
    # dynamic: shrink by sqrt(w*h/max_pixels) with int(), then floor to the factor; never enlarge
    ((1000, 600), Resolution(max_pixels=65536), (192, 320)),   # 600/3.0258=198 -> 192, 1000/3.0258=330 -> 320
    ((1328, 1328), Resolution(max_pixels=1048576), (1024, 1024)),
    ((40, 30), Resolution(max_pixels=1048576), (16, 32)),       # small: no upscale, only floored
    ((1024, 768), Resolution(max_pixels=1024 * 768), (768, 1024)),  # equal to max_pixels: untouched
    ((200, 100), Resolution(max_pixels=4096, factor=8), (40, 88)),  # 100/2.21=45 -> 40, 200/2.21=90 -> 88
    ((1000, 600), Resolution(height=512, width=256), (512, 256)),  # fixed: exactly that
    ((2000, 1200), Resolution(), (784, 1312)),                   # default max_pixels 1024*1024: 1200/1.513=793
])
def test_target_sizes(size, res, expected):
    assert res.size_for(*size) == expected
    tensor, rescaled = prepare_image(noise_image(*size), res)
    assert tuple(tensor.shape) == (3, *expected)
    assert rescaled == (expected != size[::-1])


def test_crop_and_resize_is_cover_then_centre_crop():
    image = noise_image(100, 50)
    # scale = max(32/100, 32/50) = 0.64 -> resize to (64, 32) bilinear, centre crop left = round(32/2) = 16
    expected = image.resize((64, 32), Image.BILINEAR).crop((16, 0, 48, 32))
    assert np.array_equal(np.asarray(crop_and_resize(image, 32, 32)), np.asarray(expected))
    # odd margins: torchvision's anchor int(round(m / 2)) rounds half to even: 1 -> 0, 3 -> 2
    for width, left in ((33, 0), (35, 2)):
        image = noise_image(width, 32)
        assert np.array_equal(np.asarray(crop_and_resize(image, 32, 32)), np.asarray(image)[:, left:left + 32])
    # same size: pixels untouched
    image = noise_image(48, 32)
    assert np.array_equal(np.asarray(crop_and_resize(image, 32, 48)), np.asarray(image))


def test_to_tensor_matches_diffsynth_preprocess():
    image = Image.fromarray(np.array([[[0, 128, 255]]], dtype=np.uint8))
    t = to_tensor(image)
    assert t.dtype == torch.float32 and t.shape == (3, 1, 1)
    expected = torch.tensor([0.0, 128.0, 255.0]) * (2 / 255) - 1
    assert torch.equal(t.flatten(), expected) and t.min() == -1 and t.max() == 1


def test_exif_orientation_is_applied(tmp_path):
    image = noise_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored landscape, shown portrait
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert image_size(tmp_path / "phone.jpg") == (20, 40)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)
    tensor, _ = prepare_image(tmp_path / "phone.jpg", Resolution(max_pixels=4096))
    assert tuple(tensor.shape) == (3, 32, 16)


def test_bad_resolution_settings():
    with pytest.raises(DistilleryError, match="give both or neither"):
        Resolution(height=512)
    with pytest.raises(DistilleryError, match=r"width=500: must be a positive multiple of 16.*use e\.g\. 496"):
        Resolution(height=512, width=500)
    with pytest.raises(DistilleryError, match="max_pixels"):
        Resolution(max_pixels=100)
    with pytest.raises(DistilleryError, match="too small"):
        prepare_image(noise_image(12, 40), Resolution(max_pixels=4096))


def test_truncated_image_names_row(tmp_path):
    noise_image(64, 64).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DistilleryError, match=r"metadata\.csv line 4, image.*(damaged|not a readable)"):
        load_image(tmp_path / "x.png", "metadata.csv line 4")
