"""The bf16 / CUDA paths on tiny models: sampling, SFT (full and LoRA), Direct Distill, resume.

Marked `gpu`: the default suite deselects them (pyproject's `-m 'not slow and not gpu'`); `python -m pytest -m gpu`
runs them, and they skip without CUDA. `bench/gpu_run.sh` runs them first on a lent GPU machine. To rehearse the
test code itself on a CPU (bf16 autocast on the CPU, no CUDA), set DIT_GPU_TESTS_DEVICE=cpu
(`bash bench/gpu_run.sh --dry-run` does).

Every test asserts something that can fail: finite outputs, a held-out loss that drops, bf16 against fp32 within
a stated tolerance, CUDA fp32 against CPU fp32, a resumed run equal bit for bit to an unbroken one.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

# cuBLAS is deterministic only with a fixed workspace; it reads this when its first handle is made, which is after
# collection imports this module (the resume test needs it; it costs the other tests nothing measurable).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from dit_distillery.errors import StopRequested  # noqa: E402
from dit_distillery.gen_dataset import generate_distill_dataset  # noqa: E402
from dit_distillery.lora import read_lora  # noqa: E402
from dit_distillery.tiny import tiny_pipeline  # noqa: E402
from dit_distillery.trainer import Callbacks, train  # noqa: E402
from dit_distillery.trainer.state import latest_checkpoint  # noqa: E402
from tests.trainer_helpers import make_job  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else os.environ.get("DIT_GPU_TESTS_DEVICE", "")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE not in ("cuda", "cpu"), reason="needs CUDA (DIT_GPU_TESTS_DEVICE=cpu rehearses on a CPU)")]

# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per operation). Through a tiny DiT and 4 Euler steps
# with CFG the final latents' relative error was 6.0e-3 (AAADiT) and 5.0e-3 (Qwen-Image) on a CPU's bf16; 3e-2
# leaves room for other kernels and still catches a wrong cast or a lost CFG branch. fp32 CUDA against fp32 CPU
# only differs in summation order (TF32 off): far under 1e-4.
BF16_SAMPLE_RTOL = 3e-2
FP32_DEVICE_RTOL = 1e-4
BF16_LOSS_RTOL = 1e-2  # the first training loss in bf16 autocast vs fp32 (CPU: 1.2e-4 apart)
BF16 = {"mixed_precision": "bf16", "model": {"pipeline": "tiny", "dtype": "bf16"}}  # = "auto" on a GPU
FP32 = {"mixed_precision": "no", "model": {"pipeline": "tiny", "dtype": "fp32"}}
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def _fresh_accelerate_state() -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second mixed-precision setting in it;
    each job here gets a fresh one, as a new process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    _fresh_accelerate_state()
    yield
    _fresh_accelerate_state()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def no_tf32():
    """Plain fp32 matmuls/convolutions on the GPU, so fp32 CUDA results can be held to fp32 tolerances."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def cuda_memory():
    """Peak CUDA memory allocated during the test (0 on the CPU rehearsal): proof that the work ran on the GPU."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield lambda: torch.cuda.max_memory_allocated() if CUDA else 0


def _check_on_gpu(peak: int) -> None:
    if CUDA:
        assert peak > 0, "nothing was allocated on the GPU: the job ran on the CPU"


# ----------------------------------------------------------------------------------------------------------
# Sampling

@pytest.mark.parametrize("family", ["aaadit", "qwen_image"])
def test_sampling_bf16_agrees_with_fp32(family, no_tf32, cuda_memory):
    pipe = tiny_pipeline(family)
    settings = dict(seeds=[3, 4], steps=4, cfg_scale=3.0, negative_prompt="")
    reference = pipe.sample(PROMPTS, output="latent", **settings).latents  # fp32 on the CPU
    fp32 = pipe.to(DEVICE, torch.float32).sample(PROMPTS, output="latent", **settings).latents
    bf16 = pipe.to(DEVICE, torch.bfloat16).sample(PROMPTS, output="image", **settings)
    _check_on_gpu(cuda_memory())
    assert pipe.device.type == DEVICE and pipe.dtype == torch.bfloat16
    for x in (fp32, bf16.latents, bf16.pixels):
        assert torch.isfinite(x).all()
    assert _rel(fp32, reference) < FP32_DEVICE_RTOL
    err = _rel(bf16.latents, fp32)
    assert err < BF16_SAMPLE_RTOL, f"bf16 vs fp32 relative error {err:.3g}"
    assert not torch.allclose(bf16.latents[0], bf16.latents[1])  # two seeds, two prompts: two samples
    assert len(bf16.images) == 2 and bf16.pixels.abs().max() <= 1


# ----------------------------------------------------------------------------------------------------------
# SFT (full weights and LoRA)

@pytest.mark.parametrize("mode,lr,factor", [("full", 2e-3, 0.85), ("lora", 1e-2, 0.95)])
def test_sft_in_bf16_reduces_the_held_out_loss(tmp_path, mode, lr, factor, cuda_memory):
    job = make_job(tmp_path, mode=mode, steps=30, batch_size=4, optim={"lr": lr, "warmup_steps": 2},
                   lora={"rank": 8}, loss={"kind": "flow_matching", "weighting": "none"},
                   validation={"eval_samples": 8}, **BF16)
    result = train(job)
    _check_on_gpu(cuda_memory())
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    start, end = result.eval_history[0]["eval_loss"], result.eval_history[-1]["eval_loss"]
    assert end < factor * start, result.eval_history  # fixed noise and sigmas: the drop is real
    if mode == "lora":
        lora = read_lora(result.weights)
        assert lora.modules and all(torch.isfinite(m.down).all() and torch.isfinite(m.up).all()
                                    for m in lora.modules.values())
    else:
        weights = load_file(str(result.weights))
        assert weights and all(torch.isfinite(t.float()).all() for t in weights.values())


def test_bf16_training_loss_agrees_with_fp32(tmp_path):
    """Same job, same weights, noise and sigmas: bf16 autocast on bf16 base weights against plain fp32."""
    runs = {}
    for name, precision in (("bf16", BF16), ("fp32", FP32)):
        _fresh_accelerate_state()
        runs[name] = train(make_job(tmp_path / name, steps=2, validation={"eval_samples": 4}, **precision))
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=BF16_LOSS_RTOL)
    assert bf16.eval_history[0]["eval_loss"] == pytest.approx(fp32.eval_history[0]["eval_loss"], rel=BF16_LOSS_RTOL)
    assert bf16.history[0]["loss"] != fp32.history[0]["loss"]  # the precisions really differed


# ----------------------------------------------------------------------------------------------------------
# Direct Distill: the teacher's dataset made on the device, a LoRA student trained through every student step

def test_direct_distill_in_bf16(tmp_path, cuda_memory):
    teacher = tiny_pipeline("aaadit").to(DEVICE, torch.bfloat16)
    prompts = [f"a {c} {s} on a {b} background" for c, s, b in
               (("red", "circle", "blue"), ("green", "square", "white"), ("blue", "triangle", "black"),
                ("yellow", "circle", "green"))]
    report = generate_distill_dataset(teacher, prompts, tmp_path / "data", seeds_per_prompt=2, teacher_steps=8,
                                      teacher_cfg=2.0, height=32, width=32, student_steps=2, batch_size=4)
    assert report["rows_written"] == 8
    latents = [load_file(str(p)) for p in sorted((tmp_path / "data").rglob("*.safetensors"))]
    assert latents and all(torch.isfinite(t.float()).all() for d in latents for t in d.values())
    del teacher
    job = make_job(tmp_path / "run", mode="lora", steps=30, batch_size=4, lora={"rank": 8},
                   optim={"lr": 1e-2, "warmup_steps": 2}, data={"path": str(tmp_path / "data"), "synthetic": None},
                   loss={"kind": "direct_distill"}, validation={"eval_samples": 8}, **BF16)
    result = train(job)
    _check_on_gpu(cuda_memory())
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in result.history])))
    start, end = result.eval_history[0]["eval_loss"], result.eval_history[-1]["eval_loss"]
    assert end < 0.5 * start, result.eval_history  # a CPU bf16 rehearsal reached 0.05x


# ----------------------------------------------------------------------------------------------------------
# Resume: bit for bit on the device

class _StopAt(Callbacks):
    def __init__(self, at):
        self.at, self.step = at, 0

    def on_step(self, info):
        self.step = info.step

    def stop(self):
        return self.step >= self.at


@pytest.fixture
def deterministic():
    old = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_is_bit_exact_in_bf16(tmp_path, mode, deterministic):
    def job(folder, **kw):
        return make_job(tmp_path / folder, mode=mode, steps=6, lora={"rank": 4},
                        output={"save_every": 2, "save_dtype": "fp32"}, **BF16, **kw)

    unbroken = train(job("a"))
    stopper = _StopAt(3)
    with pytest.raises(StopRequested):
        train(job("b"), callbacks=stopper, stop=stopper.stop)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "checkpoint-0000003"
    resumed = train(job("b", resume="auto"))
    a, b = load_file(str(unbroken.weights)), load_file(str(resumed.weights))
    exact = [h["loss"] for h in resumed.history] == [h["loss"] for h in unbroken.history] and \
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not exact:  # tell a checkpoint bug from a device whose kernels are not deterministic
        again = train(job("a2"))
        assert [h["loss"] for h in again.history] == [h["loss"] for h in unbroken.history], \
            "two identical unbroken runs differ: a kernel on this device is not deterministic, so no resume can be exact"
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in unbroken.history]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
