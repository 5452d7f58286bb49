"""What the recipe workflows (workflows/keep_lora_few_step_*.json, distill_flux2_klein_4step.json) need from the
nodes, run on tiny models through the nodes' own functions: a teacher as pipeline + LoRA (Load Student), a student
base with one LoRA baked into a file (Load Student's export_name) and the user's LoRA on top, trained by the Train
node (its job merges that last LoRA), and a student schedule chosen on Direct Distill Loss and Sample."""

import copy
import json

import pytest
import torch

from dit_distillery import schedule
from dit_distillery.errors import DistilleryError
from dit_distillery.lora import add_lora, save_lora
from dit_distillery.models.registry import load_dit
from dit_distillery.pipelines.loading import load_pipeline
from tests.test_nodes_common import call, fake_comfy  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lora(folder, name: str, seed: int):
    pipe = load_pipeline("tiny:z_image")
    adapted = copy.deepcopy(pipe.dit)
    add_lora(adapted, "z_image", rank=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in adapted.named_parameters():
            if "lora_B" in key:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return save_lora(adapted, folder / "models" / "loras" / name)


def test_keep_lora_graph_a_baked_turbo_lora_and_your_lora_train_as_one_job(fake_comfy):
    """Qwen-Image + Lightning in miniature: Load Student (turbo LoRA, export_name) -> Load Student (your LoRA) ->
    Train. The job's DiT is the exported file and its one LoRA is yours; the exported pipeline is not loaded twice."""
    _lora(fake_comfy.base, "lightning.safetensors", 1)
    _lora(fake_comfy.base, "style.safetensors", 2)
    base, _ = call("DD_LoadPipeline", source="tiny:z_image")
    baked, _, summary = call("DD_LoadStudent", pipeline=base, lora="lightning.safetensors",
                             export_name="student_base", unique_id="3", prompt={})
    exported = fake_comfy.base / "models" / "diffusion_models" / "student_base.safetensors"
    assert baked.dit == str(exported) and not baked.loras and "saved" in summary
    assert not baked.loaded()  # an fp32 pipeline: the bf16 file is read back, so downstream is exactly the file
    in_memory = baked.load()
    file_dit = load_dit(exported, dtype=torch.float32)
    assert all(torch.equal(v, file_dit.state_dict()[k]) for k, v in in_memory.dit.state_dict().items())
    student, _, _ = call("DD_LoadStudent", pipeline=baked, lora="style.safetensors", unique_id="4", prompt={})
    assert student.without_loras() is baked and student.without_loras().load() is in_memory
    teacher, _, _ = call("DD_LoadStudent", pipeline=base, lora="style.safetensors", unique_id="5", prompt={})
    dataset, _, report = call("DD_GenerateDistillDataset", teacher=teacher, prompts="a red circle\na blue square",
                              teacher_steps=3, teacher_cfg=4.0, width=32, height=32, student_steps=2,
                              student_cfg=1.0, batch_size=2, output_name="keep_lora")
    loss, = call("DD_DirectDistillLoss", schedule_template="Qwen-Image-Lightning")
    assert loss["template"] == "Qwen-Image-Lightning"
    _, weights, _, _ = call("DD_TrainLoRAFull", pipeline=student, dataset=dataset, loss=loss, steps=1,
                            lora_rank=2, save_every=0, gradient_checkpointing=False, output_name="repair")
    job = json.loads((fake_comfy.base / "output" / "dit_distillery" / "repair" / "job.json").read_text())
    assert job["model"]["dit"] == str(exported)
    assert job["lora"]["preset"] == str(fake_comfy.base / "models" / "loras" / "style.safetensors")
    assert job["loss"]["template"] == "Qwen-Image-Lightning"
    assert weights.endswith("repair.safetensors")


def test_export_in_a_bf16_pipeline_reuses_the_merged_dit(fake_comfy):
    """A bf16 pipeline (a GPU's): the merged DiT in memory holds exactly the exported values and is not loaded again."""
    _lora(fake_comfy.base, "lightning.safetensors", 1)
    base, _ = call("DD_LoadPipeline", source="tiny:z_image", dtype="bf16")
    baked, _, _ = call("DD_LoadStudent", pipeline=base, lora="lightning.safetensors", export_name="merged",
                       unique_id="3", prompt={})
    assert baked.loaded() and baked.load().dtype == torch.bfloat16
    file_dit = load_dit(fake_comfy.base / "models" / "diffusion_models" / "merged.safetensors")
    assert all(torch.equal(v, file_dit.state_dict()[k]) for k, v in baked.load().dit.state_dict().items())


def test_direct_distill_loss_keeps_the_family_schedule_by_default(fake_comfy):
    loss, = call("DD_DirectDistillLoss")
    assert "template" not in loss
    with pytest.raises(DistilleryError) as err:
        call("DD_DirectDistillLoss", schedule_template="no-such-template")
    assert err.value.field == "schedule_template"


def test_sample_draws_on_the_chosen_schedule(fake_comfy):
    pipeline, _ = call("DD_LoadPipeline", source="tiny:qwen_image")
    own, = call("DD_Sample", pipeline=pipeline, prompt="a cat", steps=2, cfg=1.0, width=32, height=32)
    lightning, = call("DD_Sample", pipeline=pipeline, prompt="a cat", steps=2, cfg=1.0, width=32, height=32,
                      schedule_template="Qwen-Image-Lightning")
    pipe = pipeline.load()
    sigmas = schedule.sigmas("Qwen-Image-Lightning", 2, image_seq_len=pipe.image_seq_len(32, 32))
    assert sigmas != pipe.sigmas(2, 32, 32)
    want = pipe.sample("a cat", seeds=0, steps=2, cfg_scale=1.0, height=32, width=32, sigmas=sigmas)
    torch.testing.assert_close(lightning, ((want.pixels + 1) / 2).permute(0, 2, 3, 1), atol=1e-5, rtol=0)
    assert not torch.allclose(own, lightning)
