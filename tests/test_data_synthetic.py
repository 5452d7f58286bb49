"""The built-in shapes dataset: determinism, vocabulary, DiffSynth-format output, the classifier's accuracy."""

import numpy as np
import pytest
from PIL import Image

from dit_distillery.data import COLOURS, SHAPES, classify_image, generate_samples, read_metadata, to_tensor, write_dataset
from dit_distillery.data.synthetic import caption, parse_caption, render
from dit_distillery.errors import DistilleryError


def test_deterministic_from_seed():
    a, b = generate_samples(20, seed=3), generate_samples(20, seed=3)
    assert [s.prompt for s in a] == [s.prompt for s in b] and [s.box for s in a] == [s.box for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.prompt for s in generate_samples(20, seed=4)] != [s.prompt for s in a]


def test_vocabulary_coverage_and_captions():
    n = len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1)
    samples = generate_samples(n, seed=0)
    combos = {(s.shape, s.colour, s.background) for s in samples}
    assert len(combos) == n                                     # every combination once before any repeat
    assert all(s.colour != s.background for s in samples)
    assert {s.image.size for s in samples} == {(32, 32)}
    s = samples[0]
    assert s.prompt == caption(s.shape, s.colour, s.background)
    assert parse_caption(s.prompt) == (s.colour, s.shape, s.background)
    assert caption("circle", "orange", "red") == "an orange circle on a red background"
    assert parse_caption("a cat on a sofa") is None
    fixed = generate_samples(5, seed=0, jitter=False, size=48)
    assert {x.box for x in fixed} == {(9, 9, 37, 37)} and fixed[0].image.size == (48, 48)


@pytest.mark.parametrize("size,jitter", [(32, True), (32, False), (16, True), (64, True)])
def test_classifier_is_exact_on_clean_images(size, jitter):
    samples = generate_samples(len(SHAPES) * 56, seed=size, size=size, jitter=jitter)
    wrong = [(s.prompt, classify_image(s.image)) for s in samples
             if classify_image(s.image) != (s.colour, s.shape, s.background)]
    assert wrong == []


def test_classifier_inputs_and_degraded_images():
    s = generate_samples(1, seed=9)[0]
    expected = (s.colour, s.shape, s.background)
    assert classify_image(to_tensor(s.image)) == expected        # [3,H,W] in [-1, 1]
    assert classify_image(np.asarray(s.image)) == expected       # HxWx3 uint8
    assert classify_image(Image.new("RGB", (32, 32), COLOURS["blue"])) == (None, None, "blue")
    # mild noise, as a student's output has, does not change the answer on most images
    rng = np.random.default_rng(0)
    samples = generate_samples(200, seed=1)
    noisy = [np.clip(np.asarray(x.image, dtype=np.float64) + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
             for x in samples]
    accuracy = np.mean([classify_image(img) == (x.colour, x.shape, x.background) for img, x in zip(noisy, samples)])
    assert accuracy >= 0.95
    with pytest.raises(DistilleryError, match="not an RGB image"):
        classify_image(np.zeros((4, 4)))


def test_write_dataset_is_diffsynth_format(tmp_path):
    meta = write_dataset(tmp_path / "shapes", 12, seed=2)
    assert meta.read_text().splitlines()[0] == "image,prompt,shape,colour,background"
    rows = read_metadata(tmp_path / "shapes").rows
    samples = generate_samples(12, seed=2)
    assert [r.prompt for r in rows] == [s.prompt for s in samples]
    assert [r.extra["shape"] for r in rows] == [s.shape for s in samples]
    assert np.array_equal(np.asarray(Image.open(rows[3].image).convert("RGB")), np.asarray(samples[3].image))
    with pytest.raises(DistilleryError, match="already holds a metadata.csv"):
        write_dataset(tmp_path / "shapes", 3)
    write_dataset(tmp_path / "shapes", 3, overwrite=True)
    assert len(read_metadata(tmp_path / "shapes")) == 3
    with pytest.raises(DistilleryError, match="size"):
        generate_samples(2, size=8)
    with pytest.raises(DistilleryError, match="not in the vocabulary"):
        render("hexagon", "red", "blue")
