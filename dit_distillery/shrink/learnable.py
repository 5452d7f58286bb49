"""Learnable layer selection: which blocks to keep, chosen by how well the shrunk model RECOVERS, not by how little
one block changes its input (TinyFusion, Fang et al. 2024, "TinyFusion: Diffusion Transformers Learned Shallow").

A one-shot score (`importance`: ShortGPT's 1 - cos) ranks blocks one at a time on the untouched model; what a
student needs is the set of blocks that fine-tuning repairs best. TinyFusion learns that set:

* the candidate blocks of a stack (all but its last, which Shrink DiT always keeps as the student's last block) are
  split into local groups of `group_size` consecutive blocks, each keeping a fixed share of the student's count
  (`local_groups`; TinyFusion's N:M, e.g. 2 of every 4). By default groups of 4, or ONE group when groups of 4
  would keep one block each or fewer (`auto_group_size`): then the groups only spread the kept blocks evenly over
  depth, the layout `uniform` already gives and the worst measured (bench/results/block_selection.md);
* every group has a learnable logit per candidate mask (each way to keep its k of m blocks, `candidate_masks`),
  sampled differentiably with Gumbel-softmax: hard 0/1 masks forward, soft gradients back (straight-through), the
  temperature annealed from 4 to 0.1 (`MaskSampler`);
* the source runs with the masks applied: a block of mask 0 passes its input streams through, exactly as if it
  were removed (`bypass`, generic over families: the block's bound arguments give its input streams);
* a LoRA shared by every mask trains with the logits (recoverability co-optimisation): the loss of a mask is its
  loss after a little adaptation, so a mask that fine-tuning repairs wins over one that merely hurts least
  untouched. The loss is the source's own velocity on the calibration inputs (distillation, no data labels);
* after a few hundred steps the most probable mask of each group is the selection.

`learn_blocks(model, layers, calibration)` runs it on a model in memory (any family, any droppable stack: FLUX.2's
double- and single-stream stacks are learnt together, each with its own count); `shrink(..., strategy="learnable")`
loads the source whole for it. Deterministic given `LearnSettings.seed`: Gumbel noise, minibatches and the LoRA
initialisation come from seeded CPU generators.
"""

from __future__ import annotations

import copy as copy_module
import inspect
import itertools
import math
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from .. import families
from ..errors import DistilleryError, StopRequested
from .importance import Calibration, check_calibration
from .plan import check_layers

PROXY_LEARN_BATCH = 16  # Gaussian proxy inputs `shrink()` learns on when no calibration is given
MAX_MASKS = 4096  # candidate masks per group: beyond this the categorical is too wide to learn in a few hundred steps


@dataclass
class LearnSettings:
    """How the selection is learnt. `steps` x `batch` calibration inputs; `group_size` consecutive candidate blocks
    per local group; a rank-`lora_rank` LoRA on the family's default targets (or `lora_targets`) at `lr`; the
    mask logits at `logits_lr` (both Adam); the Gumbel temperature from `tau_start` to `tau_end` (linear)."""

    steps: int = 200
    batch: int = 8
    group_size: int | None = None  # None: `auto_group_size`
    lora_rank: int = 8
    lora_targets: str | None = None
    lr: float = 1e-3
    logits_lr: float = 0.05
    tau_start: float = 4.0
    tau_end: float = 0.1
    seed: int = 0

    @classmethod
    def of(cls, value, field_name: str = "learn") -> "LearnSettings":
        """None -> the defaults; a dict (unknown keys refused) or a `LearnSettings` -> checked settings."""
        if value is None:
            settings = cls()
        elif isinstance(value, cls):
            settings = value
        elif isinstance(value, dict):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise DistilleryError(field_name, unknown, "not settings of the learnable strategy.",
                                      f"use some of {sorted(names)}.")
            settings = cls(**value)
        else:
            raise DistilleryError(field_name, type(value).__name__, "not learnable-strategy settings.",
                                  "pass a dict like {'steps': 200, 'seed': 0} or a LearnSettings.")
        settings.check(field_name)
        return settings

    def check(self, field_name: str = "learn") -> None:
        for name in ("steps", "batch", "group_size", "lora_rank"):
            value = getattr(self, name)
            if name == "group_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "group_size" else 1):
                raise DistilleryError(f"{field_name}.{name}", value, "must be a whole number of at least "
                                      f"{2 if name == 'group_size' else 1}.",
                                      f"use e.g. {getattr(LearnSettings, name) or 4}.")
        for name in ("lr", "logits_lr", "tau_start", "tau_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise DistilleryError(f"{field_name}.{name}", value, "must be a positive number.",
                                      f"use e.g. {getattr(LearnSettings, name)}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DistilleryError(f"{field_name}.seed", self.seed, "must be a whole number >= 0.", "use e.g. 0.")


# ----------------------------------------------------------------------------------------------------------
# Groups and masks

@dataclass
class LocalGroup:
    """Candidate blocks `blocks` (source indices of stack `stack`) of which `keep` are kept; `masks` [M, len(blocks)]
    lists every way to do so (1 = kept)."""

    stack: str
    blocks: list[int]
    keep: int
    masks: torch.Tensor = field(repr=False)


def local_groups(num_blocks: int, layers: int, group_size: int = 4) -> list[tuple[list[int], int]]:
    """(candidate blocks, how many to keep) per local group of a stack of `num_blocks` keeping `layers`.

    The last block is always kept, so the candidates are 0..num_blocks-2 and they keep layers-1: cut into
    ceil(candidates / group_size) consecutive groups as even as possible, each keeping its share of layers-1
    (largest remainder, ties to the earlier group). No groups when there is nothing to choose."""
    candidates, keep = num_blocks - 1, layers - 1
    if keep <= 0 or keep >= candidates:
        return []
    count = -(-candidates // group_size)
    sizes = [candidates // count + (1 if i < candidates % count else 0) for i in range(count)]
    exact = [keep * s / candidates for s in sizes]
    keeps = [int(e) for e in exact]
    for i in sorted(range(count), key=lambda i: (-(exact[i] - keeps[i]), i))[:keep - sum(keeps)]:
        keeps[i] += 1
    groups, start = [], 0
    for size, k in zip(sizes, keeps):
        groups.append((list(range(start, start + size)), k))
        start += size
    return groups


def auto_group_size(num_blocks: int, layers: int, group_size: int = 4) -> int:
    """The default group size: `group_size`, unless its groups would keep at most one block each on average; then
    one group of every candidate (any set can be kept) when its masks stay within `MAX_MASKS`.

    Measured on a 12-block teacher (bench/results/block_selection.md, 5 seeds): to 6 blocks, groups of 4 (keeping
    2, 2, 1) were best (0.037 latent MSE vs 0.042 for one group); to 4 blocks, groups of 4 had to keep one block
    of each third (0.090) while one group kept the early blocks that mattered (0.078, the best 0.074). The rule was
    chosen on that measurement, so it is not an independent test of it."""
    candidates, keep = num_blocks - 1, layers - 1
    groups = -(-candidates // group_size)
    if 0 < keep <= groups and math.comb(candidates, keep) <= MAX_MASKS:
        return max(2, candidates)
    return group_size


def candidate_masks(size: int, keep: int) -> torch.Tensor:
    """Every 0/1 mask of `size` blocks keeping exactly `keep`, [C(size, keep), size], in lexicographic order."""
    rows = [[1.0 if i in chosen else 0.0 for i in range(size)] for chosen in itertools.combinations(range(size), keep)]
    return torch.tensor(rows, dtype=torch.float32)


class MaskSampler(torch.nn.Module):
    """Learnable logits over every group's candidate masks; `forward` draws one hard mask per group (Gumbel-softmax,
    straight-through) and returns each candidate block's 0/1 mask as a differentiable scalar."""

    def __init__(self, groups: list[LocalGroup]):
        super().__init__()
        self.groups = groups
        self.logits = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(len(g.masks))) for g in groups])

    def forward(self, tau: float, generator: torch.Generator) -> dict[tuple[str, int], torch.Tensor]:
        out = {}
        for g, logits in zip(self.groups, self.logits):
            u = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1 - 1e-10).to(logits.device)
            soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=0)
            hard = torch.nn.functional.one_hot(soft.argmax(), len(soft)).to(soft.dtype)
            choice = hard - soft.detach() + soft  # forward: the hard mask; backward: the soft one's gradient
            per_block = choice @ g.masks.to(soft.device)
            for i, block in enumerate(g.blocks):
                out[(g.stack, block)] = per_block[i]
        return out

    @torch.no_grad()
    def probabilities(self) -> list[torch.Tensor]:
        return [torch.softmax(logits.detach().float().cpu(), dim=0) for logits in self.logits]

    @torch.no_grad()
    def chosen(self) -> list[list[int]]:
        """Each group's kept blocks under its most probable mask (ties: the first mask in lexicographic order)."""
        result = []
        for g, p in zip(self.groups, self.probabilities()):
            mask = g.masks[int(torch.argmax(p))]
            result.append([b for b, m in zip(g.blocks, mask.tolist()) if m])
        return result


# ----------------------------------------------------------------------------------------------------------
# Bypassing a block

_SIGNATURES: dict[type, inspect.Signature] = {}


def bypass(block: torch.nn.Module, args: tuple, kwargs: dict, output):
    """What a block's caller would hold had the block been removed: its input streams, shaped like `output`.

    A block returning one tensor gets back its `hidden_states` argument (or its first: AAADiT's `emb`, Z-Image's
    `x`); one returning diffusers' dual-stream pair `(encoder_hidden_states, hidden_states)` (Qwen-Image, FLUX.2's
    double-stream blocks) gets back those two arguments."""
    sig = _SIGNATURES.get(type(block))
    if sig is None:
        sig = _SIGNATURES[type(block)] = inspect.signature(block.forward)
    bound = sig.bind(*args, **kwargs).arguments
    if isinstance(output, torch.Tensor):
        result = bound["hidden_states" if "hidden_states" in bound else next(iter(bound))]
        pairs = [(result, output)]
    elif isinstance(output, tuple) and len(output) == 2 and {"hidden_states", "encoder_hidden_states"} <= set(bound):
        result = (bound["encoder_hidden_states"], bound["hidden_states"])
        pairs = list(zip(result, output))
    else:
        raise RuntimeError(f"learnable selection cannot bypass a {type(block).__name__}: it returns "
                           f"{type(output).__name__}, not its input stream(s)")
    if any(not isinstance(x, torch.Tensor) or x.shape != y.shape for x, y in pairs):
        raise RuntimeError(f"learnable selection cannot bypass a {type(block).__name__}: its output is not shaped "
                           "like its input stream(s)")
    return result


def _masked(block, args, kwargs, output, mask: torch.Tensor):
    """mask * output + (1 - mask) * bypass: exactly the output at 1, exactly the bypass at 0."""
    skipped = bypass(block, args, kwargs, output)
    if isinstance(output, torch.Tensor):
        m = mask.to(output.dtype)
        return m * output + (1 - m) * skipped
    return tuple(mask.to(o.dtype) * o + (1 - mask.to(o.dtype)) * s for o, s in zip(output, skipped))


class BlockMasks:
    """Forward hooks that apply per-block masks to a model's blocks while active: `masks[(stack, index)]` a scalar
    tensor (0 = bypassed, 1 = kept); blocks without an entry run as they are."""

    def __init__(self, model, keys):
        from ..velocity import base_model

        family = families.of_model(model)
        bare = base_model(model)
        self.masks: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = []
        for stack, index in keys:
            block = getattr(bare, family.group(stack).attr)[index]
            self.handles.append(block.register_forward_hook(self._hook(stack, index), with_kwargs=True))

    def _hook(self, stack, index):
        def hook(module, args, kwargs, output):
            mask = self.masks.get((stack, index))
            return None if mask is None else _masked(module, args, kwargs, output, mask)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


# ----------------------------------------------------------------------------------------------------------
# Learning

@dataclass
class LearnedSelection:
    """What `learn_blocks` chose: kept source blocks per named stack (the last always kept), each block's learnt
    probability of being kept (1 for blocks not chosen among: the last; stacks kept whole are not listed), the
    groups, the loss per step and the settings."""

    kept: dict[str, list[int]]
    keep_probability: dict[str, list[float]]
    groups: list[dict]
    losses: list[float]
    settings: LearnSettings
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"kept": self.kept, "keep_probability": self.keep_probability, "groups": self.groups,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None, "settings": asdict(self.settings),
                "seconds": round(self.seconds, 2)}

    def note(self) -> str:
        """One line for a shrink report: how the blocks were learnt."""
        s = self.settings
        loss = (f", distillation loss {self.losses[0]:.4g} -> {self.losses[-1]:.4g}" if self.losses else "")
        sizes = sorted({len(g["blocks"]) for g in self.groups})
        return (f"blocks learnt (TinyFusion) in {len(self.losses)} steps of {s.batch} calibration inputs, groups of "
                f"{'/'.join(map(str, sizes)) or '-'} blocks, LoRA rank {s.lora_rank}, seed {s.seed}{loss}; "
                "block_scores are the learnt probabilities of keeping each block.")


def _counts(layers, family, config) -> dict[str, int]:
    from .depth import parse_groups

    counts = parse_groups(layers, family, "layers", True)
    if not counts:
        raise DistilleryError("layers", layers, "the learnable strategy needs the number of blocks to keep.",
                              f"give layers (per block stack for {family.title}: "
                              + ",".join(f"{g.attr}=N" for g in family.block_groups() if not g.keep) + ").")
    for stack, n in counts.items():
        try:
            check_layers(n, config[family.group(stack).count_key])
        except DistilleryError as exc:
            prefix = "" if len(family.block_groups()) == 1 else f"{stack}: "
            raise DistilleryError(exc.field, exc.value, prefix + exc.problem, exc.fix) from None
    return counts


def plan_groups(family, config: dict, layers, group_size: int | None = None) -> tuple[dict[str, int], list[LocalGroup]]:
    """(blocks kept per named stack, the local groups to learn) for `layers` (`group_size` None: per stack,
    `auto_group_size`); refuses a group with too many masks."""
    counts = _counts(layers, family, config)
    groups = []
    for stack, n_keep in counts.items():
        n = config[family.group(stack).count_key]
        size = group_size if group_size is not None else auto_group_size(n, n_keep)
        for blocks, keep in local_groups(n, n_keep, size):
            if math.comb(len(blocks), keep) > MAX_MASKS:
                raise DistilleryError("learn.group_size", group_size, f"a group of {len(blocks)} blocks keeping {keep} "
                                      f"has {math.comb(len(blocks), keep)} candidate masks (at most {MAX_MASKS}).",
                                      "use a smaller group_size (TinyFusion's local groups are 2 to 14 blocks).")
            groups.append(LocalGroup(stack, blocks, keep, candidate_masks(len(blocks), keep)))
    return counts, groups


def _init_lora(model, seed: int) -> None:
    """Re-draw every LoRA A from a seeded CPU generator (peft's kaiming-uniform, but reproducible on any device);
    B stays zero, so the adapted model starts as the source."""
    from ..lora import ADAPTER, lora_layers

    g = torch.Generator().manual_seed(seed)
    for _, layer in sorted(lora_layers(model).items()):
        weight = layer.lora_A[ADAPTER].weight
        bound = 1 / math.sqrt(weight.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
        with torch.no_grad():
            weight.copy_((torch.rand(weight.shape, generator=g) * 2 - 1) * bound)


def learn_blocks(model, layers, calibration: Calibration, settings=None, *, device=None, progress=None, stop=None,
                 copy: bool = True) -> LearnedSelection:
    """Learn which blocks of `model` a student keeping `layers` should keep (see the module docstring).

    `layers`: the main stack's count, or per stack ('transformer_blocks=3,single_transformer_blocks=12' or a dict;
    stacks not named are kept whole); `calibration`: the inputs (a `Calibration`, as for importance; more and more
    varied inputs make a better choice); `settings`: a `LearnSettings` or dict; `copy=False` lets it adapt `model`
    itself (LoRA injected; the caller must not use it afterwards), else a copy is adapted and `model` is unchanged.
    `progress(done, total, stage="learn", loss=...)` and `stop()` as for every long job.
    """
    from ..lora import add_lora
    from ..velocity import base_model, predict_velocity

    start = time.perf_counter()
    s = LearnSettings.of(settings)
    family = families.of_model(model)
    config = dict(base_model(model).config)
    counts, groups = plan_groups(family, config, layers, s.group_size)
    cal = check_calibration(calibration, config, family=family)
    n_of = {stack: config[family.group(stack).count_key] for stack in counts}
    if not groups:  # every named stack keeps all its blocks, or only its last
        kept = {stack: (list(range(n_of[stack])) if k == n_of[stack] else [n_of[stack] - 1])
                for stack, k in counts.items()}
        return LearnedSelection(kept, {st: [1.0 if b in kept[st] else 0.0 for b in range(n_of[st])] for st in kept},
                                [], [], s, time.perf_counter() - start)
    work = copy_module.deepcopy(model) if copy else model
    dev = torch.device(device) if device is not None else next(base_model(work).parameters()).device
    work.to(dev).eval()
    latents = cal.latents.float().to(dev)
    sigmas = cal.resolved_sigmas().to(dev)
    text = cal.text.to(dev)
    pool = latents.shape[0]
    batch = min(s.batch, pool)
    with torch.no_grad():  # the source's velocities: the targets
        targets = torch.cat([predict_velocity(work, latents[i:i + batch], sigmas[i:i + batch],
                                              text.select(slice(i, i + batch))).float()
                             for i in range(0, pool, batch)])
    add_lora(work, s.lora_targets or family.default_lora_preset, rank=s.lora_rank)
    _init_lora(work, s.seed)
    lora_params = [p for p in work.parameters() if p.requires_grad]
    sampler = MaskSampler(groups).to(dev)
    optimiser = torch.optim.Adam([{"params": lora_params, "lr": s.lr},
                                  {"params": list(sampler.parameters()), "lr": s.logits_lr}])
    hooks = BlockMasks(work, [(g.stack, b) for g in groups for b in g.blocks])
    gumbel = torch.Generator().manual_seed(s.seed)
    order = torch.Generator().manual_seed(s.seed + 1)
    queue: list[int] = []
    losses = []
    try:
        for step in range(s.steps):
            if stop is not None and stop():
                raise StopRequested("learnable block selection stopped; nothing was written")
            tau = s.tau_start + (s.tau_end - s.tau_start) * step / max(1, s.steps - 1)
            if len(queue) < batch:
                queue += torch.randperm(pool, generator=order).tolist()
            idx, queue = queue[:batch], queue[batch:]
            index = torch.tensor(idx, device=dev)
            hooks.masks = sampler(tau, gumbel)
            pred = predict_velocity(work, latents[index], sigmas[index], text.select(index))
            loss = torch.nn.functional.mse_loss(pred.float(), targets[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, s.steps, stage="learn", loss=losses[-1], tau=round(tau, 3))
    finally:
        hooks.remove()
    chosen = sampler.chosen()
    probs = sampler.probabilities()
    kept, keep_probability = {}, {}
    for stack, k in counts.items():
        n = n_of[stack]
        in_groups = [(g, c, p) for g, c, p in zip(groups, chosen, probs) if g.stack == stack]
        if not in_groups:
            kept[stack] = list(range(n)) if k == n else [n - 1]
            keep_probability[stack] = [1.0 if b in kept[stack] else 0.0 for b in range(n)]
            continue
        kept[stack] = sorted(b for _, c, _ in in_groups for b in c) + [n - 1]
        marginal = [1.0] * n
        for g, _, p in in_groups:
            for i, b in enumerate(g.blocks):
                marginal[b] = float(p @ g.masks[:, i])
        keep_probability[stack] = marginal
    described = [{"stack": g.stack, "blocks": g.blocks, "keep": g.keep, "chosen": c,
                  "probability": round(float(p.max()), 4)} for g, c, p in zip(groups, chosen, probs)]
    return LearnedSelection(kept, keep_probability, described, losses, s, time.perf_counter() - start)


def learn_from_source(path, family, config: dict, layers, calibration: Calibration, settings=None, *, device=None,
                      progress=None, stop=None, field: str = "source") -> LearnedSelection:
    """`learn_blocks` on a DiT file loaded whole (Shrink DiT's streamed writer then copies the chosen blocks); its
    memory is checked before loading: the weights, their activations for a backward pass and the LoRA."""
    from ..formats import TensorSource
    from ..pipelines.loading import load_dit
    from ..weights_check import check_fits

    target = torch.device(device) if device is not None else torch.device("cpu")
    with TensorSource(path, field) as src:
        weight_bytes = sum(math.prod(src.shape(k)) * max(2, torch.empty((), dtype=src.dtype(k)).element_size())
                           for k in src.keys())
    check_fits(int(weight_bytes * 1.5), target, field="strategy", value="learnable",
               what=f"learning the kept blocks of this {family.title} DiT (the whole model, loaded for training)",
               fix="run it on a device with more memory (device=...), or use a strategy that streams the source "
                   "(uniform, interval, importance).")
    model = load_dit(path, device=target, field=field)
    try:
        return learn_blocks(model, layers, calibration, settings, device=target, progress=progress, stop=stop,
                            copy=False)
    finally:
        del model
