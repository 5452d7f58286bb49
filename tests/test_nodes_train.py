"""Train LoRA / Full inside a (fake) ComfyUI: inference mode, caching semantics, Cancel, resume, progress events."""

import json
from pathlib import Path

import pytest
import torch

from dit_distillery.errors import DistilleryError
from tests.test_nodes_common import InterruptProcessingException, call, fake_comfy, no_comfy  # noqa: F401


def _same_weights(a, b) -> bool:
    """Same tensors and metadata (safetensors' header order varies between writes, so bytes may not)."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return (fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def _state_fingerprint(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture
def setup(fake_comfy):
    dataset, _, _ = call("DD_SyntheticShapesDataset", count=8, size=32)
    small, _ = call("DD_BuildAAADiT", preset="demo", width=32, num_blocks=1, num_heads=2, name="small")
    pipe, _ = call("DD_LoadPipeline", source="default", dit=small)  # the demo pipeline with a smaller DiT: fast
    loss, = call("DD_FlowMatchingLoss", weighting="none")
    return pipe, dataset, loss


TRAIN = dict(steps=4, batch_size=2, learning_rate=5e-3, lora_rank=4, save_every=2, output_name="run",
             validation_prompts="a red circle on a blue background", validation_steps=2)


def _train(pipe, dataset, loss, **overrides):
    with torch.inference_mode():  # as ComfyUI runs every node
        return call("DD_TrainLoRAFull", pipeline=pipe, dataset=dataset, loss=loss, unique_id="12",
                    **dict(TRAIN, **overrides))


def test_second_call_same_result_and_inputs_untouched(setup, fake_comfy):
    pipe, dataset, loss = setup
    with torch.inference_mode():
        before = _state_fingerprint(pipe.load().dit)  # loaded in inference mode, as inside ComfyUI
    dataset_spec, loss_spec = json.dumps(dataset.spec), json.dumps(loss)
    model, weights, history, validation = _train(pipe, dataset, loss)
    assert [h["step"] for h in history["history"]] == [1, 2, 3, 4]
    assert validation.shape[-1] == 3 and validation.shape[1] > 32
    first = Path(weights).with_suffix(".first")
    first.write_bytes(Path(weights).read_bytes())
    again = _train(pipe, dataset, loss)  # what a second queue does when ComfyUI's cache was dropped
    assert again[2] == history and again[1] == weights and _same_weights(weights, first)
    after = _state_fingerprint(pipe.load().dit)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.dumps(dataset.spec) == dataset_spec and json.dumps(loss) == loss_spec
    assert not any("lora_" in name for name, _ in pipe.load().dit.named_parameters())  # no adapters leaked in
    # the same training under another name (a fresh run) gives the same weights: the result is the inputs'
    fresh = _train(pipe, dataset, loss, output_name="run_copy")
    assert fresh[2]["history"] == history["history"]
    from safetensors.torch import load_file

    a, b = load_file(weights), load_file(fresh[1])  # (the metadata names the run, so only tensors are compared)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the trained model is the base + the new LoRA, and differs from the base
    trained = model.load().dit.state_dict()
    assert any(not torch.equal(trained[k], after[k]) for k in after)


def test_progress_events_and_memory(setup, fake_comfy):
    pipe, dataset, loss = setup
    _train(pipe, dataset, loss, validation_every=2, eval_samples=2)
    assert fake_comfy.unloaded == 1  # ComfyUI's models were freed before training
    events = fake_comfy.of("dit_distillery.train")
    phases = [e["phase"] for e in events]
    assert phases[0] == "data" and "train" in phases and "checkpoint" in phases and phases[-1] == "done"
    steps = [e for e in events if e["phase"] == "train"]
    assert steps[0]["step"] == 1 and steps[-1]["step"] == 4  # first and last always sent
    last = steps[-1]
    for key in ("node", "prompt_id", "total", "loss", "lr", "images_per_s", "eta_s", "epoch", "history"):
        assert last[key] is not None, key
    assert last["node"] == "12" and last["prompt_id"] == "prompt-1" and last["total"] == 4
    assert [p[0] for p in last["history"]] == [1, 2, 3, 4]
    assert all(sid == "client-1" for _, _, sid in fake_comfy.events)
    validations = fake_comfy.of("dit_distillery.validation")
    assert [v["step"] for v in validations] == [2, 4]
    ref = validations[-1]
    assert ref["image"]["type"] == "output" and ref["url"].startswith("/view?filename=step-0000004.png")
    assert (fake_comfy.base / "output" / ref["image"]["subfolder"] / ref["image"]["filename"]).is_file()
    assert any(text.startswith("step 4/4") for node, text in fake_comfy.texts if node == "12")
    assert fake_comfy.bar_updates[-1] == (4, 4, "12")
    json.dumps(events)  # every payload is JSON (the server serialises it)


def test_cancel_saves_a_checkpoint_and_the_next_queue_continues(setup, fake_comfy, monkeypatch):
    import sys
    from tests.test_nodes_common import load_pack
    pipe, dataset, loss = setup
    common = sys.modules[load_pack().__name__ + ".nodes.common"]
    monkeypatch.setattr(common.Progress, "MIN_INTERVAL", 0.0)  # every update counts, however fast the steps are
    unbroken = _train(pipe, dataset, loss, output_name="unbroken", validation_prompts="")
    fake_comfy.bar_updates.clear()
    fake_comfy.interrupt_after_updates = 3  # Cancel pressed during training (after the data bar, two steps in)
    with pytest.raises(InterruptProcessingException):
        _train(pipe, dataset, loss, output_name="cancelled", validation_prompts="")
    assert fake_comfy.interrupt is False  # ComfyUI's flag is consumed, as its own nodes do
    run = fake_comfy.base / "output" / "dit_distillery" / "cancelled"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1] < "checkpoint-0000004"
    assert fake_comfy.of("dit_distillery.train")[-1]["phase"] == "stopped"
    fake_comfy.interrupt_after_updates = None
    before = len(fake_comfy.of("dit_distillery.train"))
    resumed = _train(pipe, dataset, loss, output_name="cancelled", validation_prompts="")
    assert resumed[2]["history"] == unbroken[2]["history"]  # bit-for-bit the unbroken run
    first = next(e for e in fake_comfy.of("dit_distillery.train")[before:] if e["phase"] == "train")
    # the chart goes on from the earlier steps (the trainer's on_history), not from the resumed step
    assert first["step"] > 1 and [p[0] for p in first["history"]] == list(range(1, first["step"] + 1))
    from safetensors.torch import load_file

    a, b = load_file(resumed[1]), load_file(unbroken[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changed_settings_need_a_new_name_or_restart(setup, fake_comfy):
    pipe, dataset, loss = setup
    _train(pipe, dataset, loss, validation_prompts="")
    with pytest.raises(DistilleryError, match="different job"):
        _train(pipe, dataset, loss, validation_prompts="", learning_rate=1e-3)
    longer = _train(pipe, dataset, loss, validation_prompts="", steps=6)  # extending is allowed
    assert [h["step"] for h in longer[2]["history"]] == [1, 2, 3, 4, 5, 6]
    restarted = _train(pipe, dataset, loss, validation_prompts="", learning_rate=1e-3, resume="restart")
    assert len(restarted[2]["history"]) == 4
    assert (fake_comfy.base / "output" / "dit_distillery" / "run.previous-1" / "checkpoints").is_dir()


def test_full_training_gives_a_new_dit(setup, fake_comfy):
    pipe, dataset, loss = setup
    model, weights, history, validation = _train(pipe, dataset, loss, mode="full", validation_prompts="",
                                                  learning_rate=1e-3, save_every=0)
    assert Path(weights) == fake_comfy.base / "models" / "diffusion_models" / "run.safetensors"
    assert model.dit == weights and model.loras == ()
    assert validation.shape[0] == 1  # the "no validation prompts" note
    student = model.load()
    assert student.prompt_encoder is pipe.load().prompt_encoder  # text encoder and VAE are shared, not reloaded
    images, = call("DD_Sample", pipeline=model, prompt="a red circle on a blue background", steps=2)
    assert images.shape == (1, 32, 32, 3)


def test_training_never_replaces_a_file_it_did_not_write(setup, fake_comfy):
    pipe, dataset, loss = setup
    from dit_distillery.formats import save_safetensors

    foreign = fake_comfy.base / "models" / "loras" / "run.safetensors"
    save_safetensors({"x.lora_A.weight": torch.zeros(1, 1)}, foreign, {})
    with pytest.raises(DistilleryError, match="not trained by this pack"):
        _train(pipe, dataset, loss, validation_prompts="", save_every=0)
    assert foreign.stat().st_size < 200
    assert not (fake_comfy.base / "output" / "dit_distillery" / "run").exists()  # refused before training


def test_bad_settings_fail_before_anything_is_written(setup, fake_comfy):
    pipe, dataset, loss = setup
    with pytest.raises(DistilleryError) as err:
        _train(pipe, dataset, loss, validation_seeds="zero")
    assert err.value.field == "validation_seeds"
    with pytest.raises(DistilleryError) as err:
        _train(pipe, dataset, loss, output_name="../outside")
    assert err.value.field == "output_name"
    assert not (fake_comfy.base / "output" / "dit_distillery" / "run").exists()


def test_training_without_comfyui(no_comfy):
    dataset, _, _ = call("DD_SyntheticShapesDataset", count=4, size=32)
    pipe, _ = call("DD_LoadPipeline", source="default")
    loss, = call("DD_FlowMatchingLoss")
    _, weights, history, _ = call("DD_TrainLoRAFull", pipeline=pipe, dataset=dataset, loss=loss, steps=2,
                                  batch_size=2, lora_rank=2, save_every=0)
    assert Path(weights) == no_comfy / "models" / "loras" / "student.safetensors" and len(history["history"]) == 2


def test_lora_training_shares_the_frozen_weights_full_training_copies(setup):
    import sys

    refs = sys.modules["dit_distillery_pack.nodes.refs"]
    pipe = setup[0]
    with torch.inference_mode():  # ComfyUI's worker: the ref still loads normal tensors
        base = pipe.load()
    assert not any(p.is_inference() for p in base.dit.parameters())
    shared = refs.training_pipeline(base, share_weights=True)
    copied = refs.training_pipeline(base, share_weights=False)
    assert shared.dit is not base.dit and shared.prompt_encoder is base.prompt_encoder
    pairs = list(zip(base.dit.parameters(), shared.dit.parameters(), copied.dit.parameters()))
    assert all(a is b for a, b, _ in pairs) and all(a.data_ptr() != c.data_ptr() for a, _, c in pairs)


def test_inference_tensors_are_cloned_for_training():
    import copy as copy_module
    import sys

    refs = sys.modules["dit_distillery_pack.nodes.refs"]
    from dit_distillery.tiny import tiny_pipeline

    with torch.inference_mode():
        pipe = tiny_pipeline("aaadit")
        pipe.dit = copy_module.deepcopy(pipe.dit)  # make sure every tensor is an inference tensor
    assert all(p.is_inference() for p in pipe.dit.parameters())
    work = refs.training_pipeline(pipe, share_weights=True)
    assert not any(p.is_inference() for p in work.dit.parameters())


def test_a_lora_trained_on_a_lora(setup, fake_comfy):
    pipe, dataset, loss = setup
    first, weights, _, _ = _train(pipe, dataset, loss, validation_prompts="", save_every=0)
    second, weights2, history, _ = _train(first, dataset, loss, validation_prompts="", save_every=0,
                                          output_name="run_on_run")
    assert len(history["history"]) == 4 and [Path(p).name for p, _ in second.loras] == ["run.safetensors",
                                                                                        "run_on_run.safetensors"]
    job = json.loads((fake_comfy.base / "output" / "dit_distillery" / "run_on_run" / "job.json").read_text())
    assert job["lora"]["preset"] == weights  # the first LoRA is merged, the second trained on top
    images, = call("DD_Sample", pipeline=second, prompt="a red circle on a blue background", steps=2)
    assert images.shape == (1, 32, 32, 3)


def test_dmd_on_a_prompts_dataset_with_the_teacher_input(setup, fake_comfy):
    """Prompts Dataset + DMD Loss + Train's teacher input: DMD on a student DiT of its own (as Shrink DiT gives)
    needs the teacher, which the node now sets as the job's model.teacher; losses needing images refuse."""
    teacher, _, _ = setup
    dit, _ = call("DD_BuildAAADiT", preset="demo", width=32, num_blocks=1, num_heads=2, seed=1, name="student")
    student, _ = call("DD_LoadPipeline", source="default", dit=dit)
    dataset, summary = call("DD_PromptsDataset", prompts="a red circle\n\na blue square\n", width=32, height=32)
    assert dataset.spec["prompts"] == ["a red circle", "a blue square"] and "2 prompts" in summary
    loss, = call("DD_DMDLoss", student_steps=1, fake_updates=1, fake_rank=4)
    quick = dict(steps=2, validation_prompts="", output_name="dmd")
    with pytest.raises(DistilleryError, match="model.teacher"):
        _train(student, dataset, loss, **quick)
    with pytest.raises(DistilleryError, match="teacher"):  # a teacher with a LoRA on top is not one file
        _train(student, dataset, loss, teacher=teacher.with_lora("x.safetensors"), **quick)
    _, _, history, _ = _train(student, dataset, loss, teacher=teacher, **quick)
    job = json.loads((fake_comfy.base / "output" / "dit_distillery" / "dmd" / "job.json").read_text())
    assert job["model"]["teacher"] == teacher.dit and job["model"]["dit"] == student.dit
    assert job["data"]["prompts"] == ["a red circle", "a blue square"]
    assert [h["step"] for h in history["history"]] == [1, 2] and all("fake_loss" in h for h in history["history"])
    flow, = call("DD_FlowMatchingLoss")
    with pytest.raises(DistilleryError, match="loss.kind"):
        _train(student, dataset, flow, **quick)
    with pytest.raises(DistilleryError, match="prompt"):
        call("DD_PromptsDataset", prompts=" \n", width=32, height=32)
