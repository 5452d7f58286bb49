"""The shared initial noise: DiffSynth's convention, identical across calls, batches and processes."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from dit_distillery.errors import DistilleryError
from dit_distillery.noise import initial_noise

SHAPE = (16, 8, 6)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_matches_diffsynth_generate_noise():
    # DiffSynth: torch.Generator(rand_device).manual_seed(seed); torch.randn((1, C, h, w), bf16) per image.
    g = torch.Generator("cpu").manual_seed(42)
    reference = torch.randn((1, *SHAPE), generator=g, device="cpu", dtype=torch.bfloat16)
    noise = initial_noise(42, SHAPE)
    assert noise.dtype == torch.bfloat16 and noise.shape == (1, *SHAPE)
    assert torch.equal(noise, reference)


def test_identical_across_calls_and_batches():
    batch = initial_noise([3, 1, 4], SHAPE)
    assert torch.equal(batch, initial_noise([3, 1, 4], SHAPE))
    singles = torch.cat([initial_noise(s, SHAPE) for s in (3, 1, 4)])
    assert torch.equal(batch, singles)
    assert not torch.equal(batch[0], batch[1])


def test_placement_does_not_change_values():
    bf16 = initial_noise(7, SHAPE)
    fp32 = initial_noise(7, SHAPE, device="cpu", out_dtype=torch.float32)
    assert fp32.dtype == torch.float32 and torch.equal(fp32, bf16.float())


def test_identical_across_processes():
    code = ("import hashlib, torch; from dit_distillery.noise import initial_noise; "
            f"t = initial_noise([0, 5], {SHAPE}); "
            "print(hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=".")
    assert out.stdout.strip() == _digest(initial_noise([0, 5], SHAPE))


def test_seed_types():
    ref = initial_noise([2, 9], SHAPE)
    assert torch.equal(initial_noise(np.array([2, 9]), SHAPE), ref)
    assert torch.equal(initial_noise(torch.tensor([2, 9]), SHAPE), ref)
    assert torch.equal(initial_noise(np.int64(2), SHAPE), ref[:1])


@pytest.mark.parametrize("seeds", [-1, 1.5, "3", [], True, [0, None], 2**63])
def test_bad_seeds(seeds):
    with pytest.raises(DistilleryError):
        initial_noise(seeds, SHAPE)


def test_bad_shape_and_device():
    with pytest.raises(DistilleryError):
        initial_noise(0, (16, 0, 4))
    with pytest.raises(DistilleryError):
        initial_noise(0, SHAPE, rand_device="nonsense")
