"""The learnable (TinyFusion) block selection: groups and masks, gradients, exact bypass in every family, the choice
on a constructed toy, determinism, and the strategy through shrink(), the CLI and the Shrink DiT node."""

import dataclasses
import json
import math

import pytest
import torch

from dit_distillery import families
from dit_distillery.conditioning import TextEmbeds
from dit_distillery.errors import DistilleryError
from dit_distillery.models import registry
from dit_distillery.shrink import Calibration, plan_shrink, proxy_calibration, shrink
from dit_distillery.shrink.blocks import drop_blocks
from dit_distillery.shrink.learnable import (BlockMasks, LearnSettings, LocalGroup, MaskSampler, auto_group_size,
                                             candidate_masks, learn_blocks, local_groups, plan_groups)
from dit_distillery.tiny import seeded
from dit_distillery.velocity import predict_velocity
from tests.test_nodes_common import call, fake_comfy  # noqa: F401  (fixture)


def aaadit(blocks=4, seed=0):
    from dit_distillery.models.aaadit import AAADiT

    with seeded(seed):
        return AAADiT(width=32, num_blocks=blocks, num_heads=2, ffn_ratio=2, latent_channels=16, text_width=32,
                      pos_grid=(4, 4), timestep_channels=32).eval()


def cal_for(model, batch=16, seed=0):
    return proxy_calibration(registry.model_config(model), batch=batch, latent_size=4 if families.of_model(
        model).patch == 1 else 8, text_len=5, seed=seed, family=families.of_model(model))


# ------------------------------------------------------------------------------------------------ groups and masks

def test_local_groups_partition_the_candidates_and_keep_the_count():
    assert local_groups(12, 6) == [([0, 1, 2, 3], 2), ([4, 5, 6, 7], 2), ([8, 9, 10], 1)]
    assert local_groups(12, 4) == [([0, 1, 2, 3], 1), ([4, 5, 6, 7], 1), ([8, 9, 10], 1)]
    assert local_groups(4, 1) == [] and local_groups(4, 4) == []  # nothing to choose
    for n in range(2, 30):
        for layers in range(1, n + 1):
            for size in (2, 3, 4, 7):
                groups = local_groups(n, layers, size)
                if not groups:
                    assert layers in (1, n)
                    continue
                assert [b for g, _ in groups for b in g] == list(range(n - 1))  # all but the last, in order
                assert sum(k for _, k in groups) == layers - 1
                assert all(len(g) <= size and 0 <= k <= len(g) for g, k in groups)
    # default: groups of 4, or one group when those would keep one block each (and its masks are few enough)
    assert auto_group_size(12, 6) == 4 and auto_group_size(12, 4) == 11 and auto_group_size(4, 2) == 3
    assert auto_group_size(61, 11) == 4  # one group of 60 keeping 10: too many masks to learn
    _, groups = plan_groups(families.get("aaadit"), {"num_blocks": 12}, 4)
    assert [(g.blocks, g.keep, len(g.masks)) for g in groups] == [(list(range(11)), 3, math.comb(11, 3))]
    masks = candidate_masks(4, 2)
    assert masks.shape == (6, 4) and (masks.sum(1) == 2).all() and len({tuple(m.tolist()) for m in masks}) == 6


def test_sampled_masks_keep_exactly_k_of_m_and_gradients_reach_every_logit():
    groups = [LocalGroup("blocks", [0, 1, 2, 3], 2, candidate_masks(4, 2)),
              LocalGroup("blocks", [4, 5, 6], 1, candidate_masks(3, 1))]
    sampler = MaskSampler(groups)
    with torch.no_grad():
        sampler.logits[0].copy_(torch.randn(6))
    g = torch.Generator().manual_seed(0)
    for tau in (4.0, 1.0, 0.1):
        masks = sampler(tau, g)
        values = [float(masks[("blocks", b)].detach()) for b in range(7)]
        assert set(values) <= {0.0, 1.0}  # hard forward
        assert sum(values[:4]) == 2 and sum(values[4:]) == 1
    weights = torch.arange(1.0, 8.0)
    loss = sum(w * masks[("blocks", b)] for b, w in enumerate(weights))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all() for p in sampler.logits)


def test_gradients_flow_from_the_model_loss_to_the_logits():
    model = aaadit(5)
    cal = cal_for(model, batch=4)
    groups = [LocalGroup("blocks", g, k, candidate_masks(len(g), k)) for g, k in local_groups(5, 3, 2)]
    sampler = MaskSampler(groups)
    hooks = BlockMasks(model, [("blocks", b) for g in groups for b in g.blocks])
    try:
        hooks.masks = sampler(1.0, torch.Generator().manual_seed(1))
        predict_velocity(model, cal.latents, cal.resolved_sigmas(), cal.text).square().mean().backward()
    finally:
        hooks.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sampler.logits)


# ------------------------------------------------------------------------------------------------ exact bypass

def _tiny(family: str):
    f = families.get(family)
    overrides = {"aaadit": None, "qwen_image": dict(num_layers=4), "z_image": dict(n_layers=4),
                 "flux2": dict(num_layers=3, num_single_layers=4)}[family]
    if overrides is None:
        return aaadit(4)
    with seeded(0):
        model = f.model_class()(**f.tiny_config(**overrides)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", ["aaadit", "qwen_image", "z_image", "flux2"])
def test_a_masked_block_is_exactly_a_dropped_block(family):
    """Mask 0 = the block removed, mask 1 = the block as it is, for every family's block signature."""
    model = _tiny(family)
    fam = families.of_model(model)
    drop = {g.attr: [1] for g in fam.block_groups() if not g.keep}  # drop block 1 of every droppable stack
    student = model
    for attr, gone in drop.items():
        n = len(getattr(model, attr))
        student, _ = drop_blocks(student, strategy="list", group=attr,
                                 keep_blocks=[i for i in range(n) if i not in gone])
    keys = [(attr, i) for attr in drop for i in range(len(getattr(model, attr)) - 1)]
    hooks = BlockMasks(model, keys)
    cal = cal_for(model, batch=2)
    try:
        hooks.masks = {k: torch.tensor(0.0 if k[1] in drop[k[0]] else 1.0) for k in keys}
        with torch.no_grad():
            masked = predict_velocity(model, cal.latents, cal.resolved_sigmas(), cal.text)
            dropped = predict_velocity(student, cal.latents, cal.resolved_sigmas(), cal.text)
            hooks.masks = {}
            full = predict_velocity(model, cal.latents, cal.resolved_sigmas(), cal.text)
    finally:
        hooks.remove()
    assert torch.equal(masked, dropped)
    assert not torch.allclose(full, dropped)


# ------------------------------------------------------------------------------------------------ the choice

def _toy(identity: int, essential: int, blocks: int = 4):
    """A random AAADiT where block `identity` adds nothing and block `essential` carries most of the change."""
    model = aaadit(blocks)
    with torch.no_grad():
        for name, p in model.blocks[identity].named_parameters():
            if name.startswith(("to_out.", "ff.2.")):
                p.zero_()
        for name, p in model.blocks[essential].named_parameters():
            if name.startswith(("to_out.", "ff.2.")):
                p.mul_(4)
    return model


def test_learnable_drops_the_identity_block_and_keeps_the_essential_one():
    model = _toy(identity=1, essential=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = cal_for(model, batch=8)
    fast = {"steps": 12, "batch": 4, "seed": 0}
    drop_one = learn_blocks(model, 3, cal, fast)
    assert drop_one.kept == {"blocks": [0, 2, 3]}
    probs = drop_one.keep_probability["blocks"]
    assert probs[1] == min(probs) and probs[3] == 1.0
    keep_one = learn_blocks(model, 2, cal, fast)
    assert keep_one.kept == {"blocks": [2, 3]}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the source is untouched
    once, again = (learn_blocks(model, 3, cal, {"steps": 3, "batch": 4, "seed": 5}) for _ in range(2))
    assert once.losses == again.losses and once.keep_probability == again.keep_probability  # seeded


def test_settings_and_counts_are_checked_before_any_work():
    model = aaadit(4)
    cal = cal_for(model, batch=2)
    for bad, field in (({"steps": 0}, "learn.steps"), ({"lr": -1.0}, "learn.lr"), ({"group_size": 1},
                       "learn.group_size"), ({"nope": 1}, "learn")):
        with pytest.raises(DistilleryError) as err:
            learn_blocks(model, 3, cal, bad)
        assert err.value.field == field
    with pytest.raises(DistilleryError) as err:
        learn_blocks(model, 9, cal)
    assert err.value.field == "layers"
    with pytest.raises(DistilleryError) as err:
        learn_blocks(aaadit(30), 15, cal_for(aaadit(30), batch=2), {"group_size": 29})
    assert err.value.field == "learn.group_size" and str(math.comb(29, 14)) in str(err.value)
    with pytest.raises(DistilleryError) as err:
        learn_blocks(model, 3, Calibration(torch.zeros(2, 3, 4, 4), TextEmbeds(torch.zeros(2, 5, 32))))
    assert err.value.field == "calibration.latents"
    assert LearnSettings.of({"steps": 3}).steps == 3


# ------------------------------------------------------------------------------------------------ shrink, CLI, node

def test_shrink_learnable_writes_the_learnt_blocks(tmp_path):
    model = _toy(identity=1, essential=2)
    src = tmp_path / "toy.safetensors"
    registry.save_dit(model, src)
    cal = cal_for(model, batch=8)
    cal = Calibration(cal.latents, cal.text)  # real inputs would be encoded prompts: reported as provided
    out = tmp_path / "student.safetensors"
    report = shrink(src, out, layers=3, strategy="learnable", calibration=cal, learn={"steps": 12, "batch": 4})
    assert report["strategy"] == "learnable" and report["kept_blocks"] == {"blocks": [0, 2, 3]}
    assert report["calibration"] == "provided" and len(report["block_scores"]["blocks"]) == 4
    assert any("TinyFusion" in n for n in report["notes"])
    student = registry.load_dit(out)
    assert torch.equal(student.blocks[1].to_q.weight, model.blocks[2].to_q.weight)
    with pytest.raises(DistilleryError) as err:
        plan_shrink(src, strategy="learnable")
    assert err.value.field == "layers"
    with pytest.raises(DistilleryError) as err:
        plan_shrink(src, layers=3, strategy="learnable", learn={"steps": -1})
    assert err.value.field == "learn.steps"


def test_shrink_learnable_single_stack_layout_and_per_stack(tmp_path):
    """Qwen-Image (streamed width layout) and FLUX.2 (two stacks, each its own count) take the strategy too."""
    qwen = _tiny("qwen_image")
    src = tmp_path / "qwen.safetensors"
    registry.save_dit(qwen, src)
    plan = plan_shrink(src, layers=2, strategy="learnable", learn={"steps": 3, "batch": 2})
    assert plan.strategy == "learnable" and len(plan.kept_blocks) == 2 and plan.kept_blocks[-1] == 3
    assert plan.calibration == "proxy"
    flux = _tiny("flux2")
    src = tmp_path / "klein.safetensors"
    registry.save_dit(flux, src)
    plan = plan_shrink(src, layers="transformer_blocks=2,single_transformer_blocks=2", strategy="learnable",
                       learn={"steps": 3, "batch": 2})
    assert len(plan.kept_blocks["transformer_blocks"]) == 2 and len(plan.kept_blocks["single_transformer_blocks"]) == 2
    assert plan.kept_blocks["transformer_blocks"][-1] == 2 and plan.kept_blocks["single_transformer_blocks"][-1] == 3


def test_cli_accepts_learnable(tmp_path, capsys):
    from dit_distillery.cli import main

    src = tmp_path / "toy.safetensors"
    registry.save_dit(aaadit(4), src)
    code = main(["shrink", str(src), "--layers", "3", "--strategy", "learnable", "--learn-steps", "3",
                 "--learn-seed", "1", "--json", "--dry-run"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["strategy"] == "learnable" and len(report["kept_blocks"]["blocks"]) == 3
    assert any("3 steps" in n and "seed 1" in n for n in report["notes"])


def test_node_accepts_learnable(fake_comfy, monkeypatch):  # noqa: F811
    from dit_distillery.shrink import learnable

    src = fake_comfy.base / "models" / "diffusion_models" / "toy.safetensors"
    src.parent.mkdir(parents=True, exist_ok=True)
    registry.save_dit(aaadit(4), src)
    seen = []
    real = learnable.learn_blocks

    def quick(model, layers, calibration, settings=None, **kw):  # the node's settings, 3 steps (a fast test)
        seen.append((layers, settings))
        return real(model, layers, calibration, dataclasses.replace(settings, steps=3, batch=4), **kw)

    monkeypatch.setattr(learnable, "learn_blocks", quick)
    dit, report = call("DD_ShrinkDiT", source="toy.safetensors", target_blocks=2, strategy="learnable",
                       calibration_seed=7, name="toy_learnt.safetensors")
    assert dit.config["num_blocks"] == 2 and "strategy: learnable" in report and "calibration: proxy" in report
    assert seen == [({"blocks": 2}, LearnSettings(seed=7))]
