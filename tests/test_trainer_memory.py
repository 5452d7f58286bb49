"""The trainer's memory options (issue 11 §1) on the tiny AAADiT pipeline, on the CPU: `base_dtype: fp8` (the frozen
DiT's Linears stored in float8_e4m3fn, computed in fp32 here; LoRA adapters fp32), `blocks_to_swap` (exact on the
CPU: the same tensors, copied), the text encoder and VAE parked between uses, the nodes' options, and (marked
`gpu`) the memory plan's prediction against the measured peak of a real run.

fp8 tolerances: e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4 per weight, one scale per tensor). SFT: the
training loss of the same batches and noise moved by 5e-4 relative at most over these steps; 2e-2 relative catches
a wrong scale without flaking. Direct Distill's loss is the student's squared distance to the teacher's latents
(unit variance), near 0 for this student: an fp8 base adds about the square of its relative output error
(measured +4.8e-4 on 3.6e-3); 2e-3 absolute. An fp8 base that is not one (left in full precision) fails the
inequality checks.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dit_distillery.block_swap import block_swap_of
from dit_distillery.errors import DistilleryError
from dit_distillery.fp8 import FP8_DTYPES, is_fp8_linear
from dit_distillery.trainer import Callbacks, TrainJob
from dit_distillery.trainer.loop import Trainer
from dit_distillery.trainer.validation import Components
from tests.test_nodes_common import fake_comfy  # noqa: F401 (a fixture)
from tests.trainer_helpers import make_job

FP8_LOSS_RTOL = 2e-2
FP8_DISTILL_ATOL = 2e-3


class Log(Callbacks):
    def __init__(self):
        self.messages, self.steps = [], []

    def on_message(self, text):
        self.messages.append(text)

    def on_step(self, info):
        self.steps.append(info)


def _run(job, pipeline=None):
    log = Log()
    trainer = Trainer(job, pipeline=pipeline, callbacks=log)
    return trainer.run(), trainer, log


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


def _close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b))


def _same_file(a, b) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _check_fp8_base(dit) -> None:
    """Every LoRA layer's base_layer is an fp8 Linear; the adapters are fp32 and train."""
    lora = {n: m for n, m in dit.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    assert lora
    for m in lora.values():
        assert is_fp8_linear(m.base_layer) and m.base_layer.weight.dtype in FP8_DTYPES
        assert not m.base_layer.weight.requires_grad
        for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
            assert p.dtype == torch.float32 and p.requires_grad


# ----------------------------------------------------------------------------------------------------------
# The job's fields

@pytest.mark.parametrize("overrides,field,words", [
    ({"base_dtype": "fp16"}, "base_dtype", "allowed values"),
    ({"base_dtype": "fp8", "mode": "full"}, "base_dtype", "bf16"),
    ({"blocks_to_swap": -1}, "blocks_to_swap", "auto"),
    ({"blocks_to_swap": "some"}, "blocks_to_swap", "auto"),
    ({"blocks_to_swap": True}, "blocks_to_swap", "auto"),
    ({"blocks_to_swap": 1.5}, "blocks_to_swap", "auto"),
    ({"blocks_to_swap": 2, "compile": True}, "blocks_to_swap", "compile"),
])
def test_job_refuses_bad_base_dtype_and_blocks_to_swap(tmp_path, overrides, field, words):
    with pytest.raises(DistilleryError) as err:
        make_job(tmp_path, **{"mode": "lora", **overrides})
    assert err.value.field == field and str(overrides[field]) in str(err.value.value)
    assert words in f"{err.value.problem} {err.value.fix}"


def test_job_fields_and_what_a_resume_must_share(tmp_path):
    base = make_job(tmp_path, mode="lora")
    assert base.base_dtype == "bf16" and base.blocks_to_swap == 0
    assert make_job(tmp_path, mode="lora", blocks_to_swap="auto").blocks_to_swap == "auto"
    # swapping is exact: a run may resume with another count; an fp8 base gives other weights: it may not
    assert make_job(tmp_path, mode="lora", blocks_to_swap=3).fingerprint() == base.fingerprint()
    assert make_job(tmp_path, mode="lora", base_dtype="fp8").fingerprint() != base.fingerprint()
    data = base.to_dict()
    del data["base_dtype"], data["blocks_to_swap"]  # a job written before the settings existed: the same run
    assert TrainJob.from_dict(data).fingerprint() == base.fingerprint()


# ----------------------------------------------------------------------------------------------------------
# Training runs

def test_lora_sft_fp8_base_swap_auto_resume_and_parked_components(tmp_path):
    from dit_distillery.tiny import tiny_pipeline

    lora = {"rank": 4}
    validation = {"prompts": ["a red circle on a blue background"], "steps": 2}
    # full precision, with the text encoder's and VAE's moves recorded
    pipe = tiny_pipeline("aaadit")
    moves, decoded_at = [], []
    for name in ("prompt_encoder", "codec"):
        part = getattr(pipe, name)
        original = part.to

        def to(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(kwargs.get("device"))))
            return _original(*args, **kwargs)

        part.to = to
    decode = pipe.codec.decode
    pipe.codec.decode = lambda x: (decoded_at.append(len(moves)), decode(x))[1]
    trainer = Trainer(make_job(tmp_path / "plain", mode="lora", steps=3, lora=lora, validation=validation),
                      pipeline=pipe)
    moves.clear()  # (placing the pipeline)
    plain = trainer.run()
    assert block_swap_of(trainer.parts.model.dit) is None and trainer.parts.memory.plan is None  # (CPU, no swap)
    # cached data: parked after the cache, brought back only while the validation samples (the end's, one image
    # decoded), parked again; the device is the CPU here (the moves to a GPU: the next test)
    both = [("prompt_encoder", "cpu"), ("codec", "cpu")]
    assert moves == both * 3 and decoded_at == [4] and trainer.parts.validator.components.parked

    # two blocks swapped (all of the tiny DiT's): bit-identical losses, weights and validation images
    swapped, trainer, log = _run(make_job(tmp_path / "swap", mode="lora", steps=3, lora=lora, validation=validation,
                                          blocks_to_swap=2))
    assert block_swap_of(trainer.parts.model.dit).count == 2 and trainer.parts.memory.blocks_to_swap == 2
    assert any(m.startswith("memory plan:") and "2 of 2 blocks swapped" in m for m in log.messages)
    assert _losses(swapped) == _losses(plain) and _same_file(swapped.weights, plain.weights)
    from PIL import Image, ImageChops

    with Image.open(swapped.validation[-1]) as a, Image.open(plain.validation[-1]) as b:
        assert ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None

    # fp8 base, blocks_to_swap auto (0 on the CPU): close to full precision, base fp8, adapters fp32
    fp8_job = dict(mode="lora", lora=lora, base_dtype="fp8", blocks_to_swap="auto", output={"save_every": 2})
    unbroken, trainer, log = _run(make_job(tmp_path / "fp8", steps=3, **fp8_job))
    assert trainer.parts.memory.blocks_to_swap == 0 and block_swap_of(trainer.parts.model.dit) is None
    assert any("blocks_to_swap auto: 0" in m for m in log.messages)
    _check_fp8_base(trainer.parts.model.dit)
    assert _close(_losses(unbroken), _losses(plain), FP8_LOSS_RTOL) and _losses(unbroken) != _losses(plain)
    exported, reference = load_file(str(unbroken.weights)), load_file(str(plain.weights))
    # the exported LoRA: the same format as ever (names, dtypes, shapes)
    assert {k: (t.dtype, t.shape) for k, t in exported.items()} == {k: (t.dtype, t.shape) for k, t in reference.items()}

    # exact resume: two steps, then two more from the checkpoint (the base re-quantised from the same weights)
    _run(make_job(tmp_path / "resumed", steps=2, **fp8_job))
    resumed, trainer, _ = _run(make_job(tmp_path / "resumed", steps=3, resume="auto", **fp8_job))
    assert trainer.state.resumed_from is not None
    assert _losses(resumed) == _losses(unbroken) and _same_file(resumed.weights, unbroken.weights)


@pytest.fixture(scope="module")
def distill_data(tmp_path_factory):
    from dit_distillery.gen_dataset import generate_distill_dataset
    from dit_distillery.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("distill")
    generate_distill_dataset(tiny_pipeline("aaadit"), ["a red circle on a blue background",
                                                      "a green square on a white background"],
                             path, teacher_steps=4, teacher_cfg=2.0, height=32, width=32, student_steps=2)
    return path


def test_direct_distill_with_fp8_base_and_swap(tmp_path, distill_data):
    """Direct Distill unrolls 2 student steps with grad: swapped blocks are fetched for each forward and each
    checkpointed recomputation; exact. The fp8 base trains close to the full-precision one."""
    job = dict(mode="lora", steps=3, lora={"rank": 4}, loss={"kind": "direct_distill"},
               data={"path": str(distill_data), "synthetic": None})
    plain, _, _ = _run(make_job(tmp_path / "plain", **job))
    swapped, trainer, _ = _run(make_job(tmp_path / "swap", blocks_to_swap=1, **job))
    assert block_swap_of(trainer.parts.model.dit).count == 1
    assert trainer.parts.memory.plan.setting["steps"] == 2  # planned with the unrolled steps
    assert _losses(swapped) == _losses(plain) and _same_file(swapped.weights, plain.weights)
    fp8, trainer, _ = _run(make_job(tmp_path / "fp8", base_dtype="fp8", **job))
    _check_fp8_base(trainer.parts.model.dit)
    assert all(abs(a - b) <= FP8_DISTILL_ATOL for a, b in zip(_losses(fp8), _losses(plain), strict=True))
    assert _losses(fp8) != _losses(plain)


def test_too_many_blocks_to_swap_is_refused_by_name(tmp_path):
    with pytest.raises(DistilleryError) as err:
        _run(make_job(tmp_path, mode="lora", steps=1, lora={"rank": 4}, blocks_to_swap=3))
    assert err.value.field == "blocks_to_swap" and err.value.value == 3


# ----------------------------------------------------------------------------------------------------------
# The text encoder and VAE between uses (a fake CUDA device: only the moves are recorded)

def test_components_park_and_come_back_for_sampling():
    class Part:
        def __init__(self, log, name):
            self.log, self.name = log, name

        def to(self, device=None):
            self.log.append((self.name, str(device)))
            return self

    log = []
    pipe = type("Pipe", (), {})()
    pipe.prompt_encoder, pipe.codec = Part(log, "text"), Part(log, "vae")
    components = Components(pipe, torch.device("cuda"))
    with components.in_use():  # not parked yet: nothing moves
        pass
    assert log == []
    components.park()
    assert log == [("text", "cpu"), ("vae", "cpu")]
    with components.in_use():
        assert log[2:] == [("text", "cuda"), ("vae", "cuda")]
    assert log[4:] == [("text", "cpu"), ("vae", "cpu")]
    log.clear()
    kept = Components(pipe, torch.device("cuda"), keep_codec=True)  # a loss decoding images keeps the VAE
    kept.park()
    assert log == [("text", "cpu")]


# ----------------------------------------------------------------------------------------------------------
# Nodes

def test_load_pipeline_and_train_node_take_the_options(fake_comfy):
    from tests.test_nodes_common import call, load_pack  # noqa: F811

    pack = load_pack()
    for node in ("DD_LoadPipeline", "DD_TrainLoRAFull", "DD_ExportTrainingJob"):
        optional = pack.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["optional"]
        assert optional["base_dtype"][0] == ["bf16", "fp8"] and optional["blocks_to_swap"][1]["min"] == -1

    plain, _ = call("DD_LoadPipeline", source="tiny:aaadit")
    fp8, summary = call("DD_LoadPipeline", source="tiny:aaadit", base_dtype="fp8", blocks_to_swap=-1)
    swapped, _ = call("DD_LoadPipeline", source="tiny:aaadit", blocks_to_swap=2)
    assert "fp8 base" in summary and fp8.blocks_to_swap == "auto"
    with pytest.raises(DistilleryError) as err:
        call("DD_LoadPipeline", source="tiny:aaadit", blocks_to_swap=-2)
    assert err.value.field == "blocks_to_swap"
    assert all(is_fp8_linear(m) for n, m in fp8.load().dit.named_modules() if n.endswith("to_q"))
    assert block_swap_of(fp8.load().dit) is None  # auto: 0 on the CPU
    assert block_swap_of(swapped.load().dit).count == 2
    settings = dict(prompt="a red circle", seed=0, steps=2, cfg=2.0, width=32, height=32)
    a, b = plain.load().sample(**_sample_args(settings)), swapped.load().sample(**_sample_args(settings))
    assert torch.equal(a.latents, b.latents)  # (swap is exact)

    dataset, _, _ = call("DD_SyntheticShapesDataset", count=4, size=32)
    loss, = call("DD_FlowMatchingLoss", weighting="none")
    with torch.inference_mode():  # as ComfyUI runs every node
        model, weights, history, _ = call("DD_TrainLoRAFull", pipeline=swapped, dataset=dataset, loss=loss,
                                          steps=2, batch_size=2, lora_rank=4, output_name="fp8run",
                                          base_dtype="fp8", blocks_to_swap=1)
    job = TrainJob.load(fake_comfy.base / "output" / "dit_distillery" / "fp8run" / "job.json")
    assert job.base_dtype == "fp8" and job.blocks_to_swap == 1 and len(history["history"]) == 2
    # the loaded pipeline is placed as before (swapped on the same blocks, full precision), and samples the same
    dit = swapped.load().dit
    assert block_swap_of(dit).count == 2 and not any(is_fp8_linear(m) for m in dit.modules())
    assert not any("lora_" in n for n, _ in dit.named_parameters())
    assert torch.equal(swapped.load().sample(**_sample_args(settings)).latents, a.latents)
    # the trained model: the LoRA merged into a copy of the swapped pipeline's DiT, swapped too
    trained = model.load()
    assert block_swap_of(trained.dit).count == 2
    out = trained.sample(**_sample_args(settings)).latents
    assert torch.isfinite(out).all() and not torch.equal(out, a.latents)
    # an fp8 pipeline is an fp8 base, for the job too
    path, _ = call("DD_ExportTrainingJob", pipeline=fp8, dataset=dataset, loss=loss, output_name="exported")
    assert TrainJob.load(path).base_dtype == "fp8"


def test_lora_merged_into_an_fp8_pipeline(fake_comfy, tmp_path):
    """A LoRA on a pipeline loaded with an fp8 base (what Train returns as `model`) is merged into the weights the
    fp8 Linears compute with (their scale included) and stored in fp8 again: its samples land near the
    full-precision merge's, far from the base's."""
    from dit_distillery.lora import add_lora, save_lora
    from dit_distillery.tiny import tiny_pipeline
    from tests.test_nodes_common import call  # noqa: F811

    donor = tiny_pipeline("aaadit")
    add_lora(donor.dit, "aaadit_attn", rank=4)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for n, p in donor.dit.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    save_lora(donor.dit, tmp_path / "l.safetensors")
    plain, _ = call("DD_LoadPipeline", source="tiny:aaadit")
    fp8, _ = call("DD_LoadPipeline", source="tiny:aaadit", base_dtype="fp8")
    merged = fp8.with_lora(str(tmp_path / "l.safetensors")).load()
    assert all(is_fp8_linear(m) for n, m in merged.dit.named_modules() if n.endswith("to_q"))
    settings = dict(prompt="a red circle", seed=0, steps=2, cfg=2.0, width=32, height=32)
    reference = plain.with_lora(str(tmp_path / "l.safetensors")).load().sample(**_sample_args(settings)).latents
    out = merged.sample(**_sample_args(settings)).latents
    base = fp8.load().sample(**_sample_args(settings)).latents
    assert _rel(out, reference) < 0.2 * _rel(base, reference), (_rel(out, reference), _rel(base, reference))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _sample_args(s: dict) -> dict:
    return dict(prompts=[s["prompt"]], seeds=[s["seed"]], steps=s["steps"], cfg_scale=s["cfg"], width=s["width"],
                height=s["height"], output="latent")


# ----------------------------------------------------------------------------------------------------------
# CUDA: the run's predicted peak against the measured one

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overrides", [{}, {"base_dtype": "fp8"}, {"blocks_to_swap": 6}],
                         ids=["bf16", "fp8", "swap6"])
def test_gpu_run_predicted_peak_within_15_percent_of_measured(tmp_path, overrides):
    """A LoRA SFT run (bf16 autocast, gradient checkpointing, AdamW) of a 12-block Qwen-Image 1536 wide at
    512x512 through the trainer, with the tiny pipeline's text encoder and VAE (parked while the DiT trains):
    the plan's total (logged, in memory_plan.json, in StepInfo) within 15% of max_memory_allocated over the
    training steps."""
    import json

    from dit_distillery import families
    from dit_distillery.tiny import tiny_pipeline

    pipe = tiny_pipeline("qwen_image")
    spec = families.get("qwen_image")
    width = pipe.prompt_encoder.width
    config = spec.tiny_config(num_layers=12, num_attention_heads=12, attention_head_dim=128,
                              joint_attention_dim=width)
    torch.manual_seed(0)
    pipe = pipe.with_dit(spec.model_class()(**config).to(torch.bfloat16))
    pipe.to(device="cuda", dtype=torch.bfloat16)
    job = make_job(tmp_path, mode="lora", steps=3, lora={"rank": 32}, batch_size=1,
                   data={"synthetic": {"count": 2, "size": 512}, "height": 512, "width": 512},
                   model={"pipeline": "tiny:qwen_image", "dtype": "bf16"}, mixed_precision="bf16", **overrides)
    result, trainer, log = _run(job, pipeline=pipe)
    memory = result.data["memory"]
    measured, predicted = memory["measured_peak_bytes"], memory["predicted_peak_bytes"]
    assert log.steps[-1].peak_memory_bytes == measured and log.steps[-1].predicted_peak_bytes == predicted
    written = json.loads((tmp_path / "memory_plan.json").read_text())
    assert written["measured_peak_bytes"] == measured and written["total_bytes"] == predicted
    assert abs(predicted - measured) <= 0.15 * measured, (written["parts_bytes"], measured)
