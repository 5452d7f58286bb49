"""Block swap: keep N of a DiT's transformer blocks in CPU memory and stream each to the GPU just before it runs.

What travels: the *frozen* tensors of a swapped block (every parameter that does not require grad, and its
buffers), host -> device only. The CPU copy is the master and is never written; after a block has run its GPU
copy is simply dropped (never copied back). Trainable parameters (LoRA's `lora_` adapters, anything with
`requires_grad`) stay resident on the GPU, wherever they sit, and are never swapped; so do the embedders and
the head. A swapped block's frozen tensors are packed into one flat buffer per block (pinned on a CUDA machine),
so a fetch is one host->device copy per block.

Overlap: fetches are issued on a side CUDA stream; when block i starts, the next swapped block in execution order
(learnt from the first forward) is prefetched, so its copy runs while i and the resident blocks after it compute.
The compute stream waits on the copy's event (no host synchronisation) and `record_stream` keeps the allocator
from reusing a dropped copy's memory while queued kernels still read it. At most two swapped blocks are on the GPU
at a time (the one running and the one prefetched); without grad (sampling) the first swapped block is prefetched
again after the last, for the next step.

Backward: with per-block gradient checkpointing (diffusers' `enable_gradient_checkpointing`), the recomputation
calls the block again, which re-triggers its fetch (and prefetches the block before it, since backward runs in
reverse); the last swapped block of a training forward is kept for the recomputation that comes first. During
a block's forward its module attributes point at the GPU copies (the `_parameters` / `_buffers` entries are
swapped the way `torch.func.functional_call` swaps them), so what autograd saves are those copies, never the CPU
masters: without checkpointing, autograd therefore holds every swapped block's copy until that block's backward,
which is correct but saves no memory in training (`memory_plan` counts it so). Results and gradients are
bit-identical to the unswapped model: the same tensors, copied.

Why not diffusers' group offloading (`diffusers.hooks.apply_group_offloading`, block_level, use_stream,
record_stream; checked against diffusers 0.36-0.42), which its authors wrote for inference:
* it offloads every tensor of a group, trainable LoRA parameters included, and with streams it restores the pinned
  CPU snapshot taken when offloading was applied (`param.data = cpu_param_dict[param]`), so optimizer updates made
  to the GPU copy are lost, and `.grad` (on the GPU) no longer matches `.data` (on the CPU) at the optimizer step;
* it swaps `param.data` in place, and autograd saves the parameter itself (a leaf), so after its post-forward
  offload the saved weights of a block point at CPU memory when backward reaches them;
* its hooks are forward-only and its prefetch order is the forward order: a checkpointed recomputation (backward,
  reverse order) prefetches the wrong block and offloads the block again before its backward has run;
* block_level offloads every block of each ModuleList; there is no "N of them, the rest resident".

API: `enable_block_swap(dit, blocks_to_swap, device)` (an int, or "auto" with a `memory_plan.MemoryPlan`: the
fewest blocks that fit the device's free memory) -> `BlockSwap`; `disable_block_swap(dit)`; `block_swap_of(dit)`.
Call it after choosing what trains (LoRA injected, `requires_grad` set) and instead of moving the DiT to the GPU:
it places the DiT itself (resident parts on `device`, swapped blocks' frozen tensors on the CPU). Do not `.to()`
the DiT while swap is on (disable first). Blocks compiled with `torch.compile` are refused.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from . import families
from .errors import DistilleryError
from .velocity import base_model

ALIGN = 256  # byte alignment of every tensor inside a block's flat buffer (what CUDA kernels assume)
_ATTR = "_dit_distillery_block_swap"


# ----------------------------------------------------------------------------------------------------------
# Which blocks: shared with memory_plan, so the plan and the runtime swap the same ones


def block_list(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every transformer block, in the family's `block_groups()` order."""
    spec = families.of_model(model)
    return [(f"{g.attr}.{i}", block) for g in spec.block_groups() for i, block in enumerate(getattr(model, g.attr))]


def _bit_reversed(n: int) -> list[int]:
    """0..n-1 in bit-reversed order: every prefix is spread evenly over the range (0, n/2, n/4, 3n/4, ...)."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def swap_order(sizes: list[int]) -> list[int]:
    """The order blocks (positions in `block_list`) are chosen for swapping: the largest first (each swapped
    block saves its bytes, and the two GPU buffers are as big as the largest swapped block, so memory never grows
    with N), each size spread over its stack (a copy then overlaps with the resident blocks between two swapped
    ones). Nested: the first N+1 contain the first N. Blocks of size 0 (nothing frozen) are never swapped."""
    order = []
    for size in sorted({s for s in sizes if s > 0}, reverse=True):
        same = [i for i, s in enumerate(sizes) if s == size]
        order.extend(same[k] for k in _bit_reversed(len(same)))
    return order


def chosen_blocks(sizes: list[int], n: int) -> list[int]:
    """The N blocks swapped (positions in `block_list`, ascending)."""
    return sorted(swap_order(sizes)[:n])


# ----------------------------------------------------------------------------------------------------------
# One swapped block: its frozen tensors in one flat host buffer


@dataclass
class _Entry:
    module: torch.nn.Module
    table: str  # "_parameters" or "_buffers"
    name: str
    original: torch.Tensor  # the Parameter / buffer object the module holds at rest (its .data: the host view)
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple


@dataclass
class _Store:
    name: str
    block: torch.nn.Module
    host: torch.Tensor  # uint8, every frozen tensor of the block at ALIGN-aligned offsets
    entries: list[_Entry]
    registered: bool = False  # pinned with cudaHostRegister (unregistered on disable)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]


@dataclass
class _Fetch:
    flat: torch.Tensor
    event: object = None  # torch.cuda.Event recorded after the copy on the side stream


def _frozen_tensors(block: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str, torch.Tensor]]:
    """The tensors a swap of `block` moves: frozen ones, not LoRA adapters' (an adapter frozen for now, such as
    DMD's fake score between its updates, is made trainable later, and may be added after the swap: resident)."""
    out = []
    for module_name, module in block.named_modules():
        if "lora_" in module_name:
            continue
        for table in ("_parameters", "_buffers"):
            for name, t in getattr(module, table).items():
                if t is not None and not t.requires_grad:
                    out.append((module, table, name, t))
    return out


def frozen_bytes(block: torch.nn.Module) -> int:
    """Bytes a swap of this block moves (its frozen parameters and buffers, as stored)."""
    return sum(t.numel() * t.element_size() for *_, t in _frozen_tensors(block))


def _unregister(pointers: list[int]) -> None:
    for ptr in pointers:
        torch.cuda.cudart().cudaHostUnregister(ptr)


def _pin(host: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Page-lock a host buffer for asynchronous copies. cudaHostRegister pins the buffer as it is; PyTorch's
    `pin_memory()` would round every allocation up to a power of two (a 680 MB Qwen-Image block would take
    1 GiB), so it is only the fallback."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 0)
        if int(err) == 0 and host.is_pinned():
            return host, True
    except (RuntimeError, AttributeError):
        pass
    return host.pin_memory(), False


# ----------------------------------------------------------------------------------------------------------
# The swap


class BlockSwap:
    """Block swap on one DiT (see the module docstring). Made by `enable_block_swap`; `disable()` undoes it."""

    def __init__(self, model: torch.nn.Module, blocks_to_swap: int, device, *, prefetch: bool = True):
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = prefetch
        blocks = block_list(model)
        for name, block in blocks:
            if getattr(block, "_compiled_call_impl", None) is not None:
                raise DistilleryError("blocks_to_swap", blocks_to_swap, f"block {name} is compiled (torch.compile); "
                                      "swapped blocks change their tensors at every call.",
                                      "turn compile off, or blocks_to_swap 0.")
        sizes = [frozen_bytes(block) for _, block in blocks]
        swappable = sum(1 for s in sizes if s > 0)
        if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int) or not 0 <= blocks_to_swap <= swappable:
            why = (" (every block trains: only frozen weights are swapped)" if swappable == 0 else "")
            raise DistilleryError("blocks_to_swap", blocks_to_swap, f"must be a whole number from 0 to {swappable}, "
                                  f"the blocks with frozen weights{why}.",
                                  f"use 0..{swappable}, or 'auto' with a memory plan; to sample, freeze the DiT "
                                  "first (dit.requires_grad_(False)).")
        chosen = chosen_blocks(sizes, blocks_to_swap)
        self.names = [blocks[i][0] for i in chosen]
        self.stream = torch.cuda.Stream(self.device) if self.cuda and prefetch else None
        self.stats = {"fetches": 0, "prefetches": 0, "prefetch_hits": 0, "waits": 0}
        self._stores: list[_Store] = []
        self._handles: list = []
        self._loaded: dict[int, _Fetch] = {}  # store index -> its GPU copy (prefetched or kept)
        self._in_use: dict[int, tuple[_Fetch, list]] = {}
        self._order: list[int] = []  # store indices in execution order (learnt from a whole forward)
        self._pass: list[int] | None = None
        self._passes_to_backprop = 0  # forwards with grad since the last backward (Direct Distill runs several)
        self._backward_seen = False
        chosen_set = set(chosen)
        # resident parts first (trainable tensors of swapped blocks included), one tensor at a time
        self.place_resident({id(t) for i in chosen for *_, t in _frozen_tensors(blocks[i][1])})
        with torch.no_grad():
            for i, (name, block) in enumerate(blocks):
                if i in chosen_set:
                    self._stores.append(self._pack(name, block))
        # registered host memory is unregistered on disable, or when the swap is collected with its model
        self._unpin = weakref.finalize(self, _unregister, [s.host.data_ptr() for s in self._stores if s.registered])
        for k, store in enumerate(self._stores):
            self._handles.append(store.block.register_forward_pre_hook(self._pre_hook(k)))
            self._handles.append(store.block.register_forward_hook(self._post_hook(k), always_call=True))
        self._handles.append(model.register_forward_pre_hook(self._model_pre_hook))
        self._handles.append(model.register_forward_hook(self._model_post_hook, always_call=True))

    # -- setup
    def _pack(self, name: str, block: torch.nn.Module) -> _Store:
        tensors = _frozen_tensors(block)
        entries, offset = [], 0
        for module, table, tname, t in tensors:
            nbytes = t.numel() * t.element_size()
            entries.append(_Entry(module, table, tname, t, offset, nbytes, t.dtype, tuple(t.shape)))
            offset += -(-nbytes // ALIGN) * ALIGN
        host = torch.empty(max(offset, 1), dtype=torch.uint8)
        store = _Store(name, block, host, entries)
        for entry, view in zip(entries, store.views(host)):
            view.copy_(entry.original.data)
        if self.cuda:
            store.host, store.registered = _pin(host)
        for entry, view in zip(entries, store.views(store.host)):
            entry.original.data = view  # the module's own tensor object now reads the host master
        return store

    # -- fetching
    def _fetch(self, k: int) -> _Fetch:
        """Issue block k's host -> device copy (on the side stream when there is one)."""
        self.stats["fetches"] += 1
        host = self._stores[k].host
        if self.stream is None:
            return _Fetch(host.to(self.device, copy=True, non_blocking=self.cuda))
        with torch.cuda.stream(self.stream):
            flat = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return _Fetch(flat, event)

    def _prefetch(self, k: int | None) -> None:
        if k is None or not self.prefetch or k in self._loaded or k in self._in_use:
            return
        for old in [j for j in self._loaded if j != k]:  # at most the running block and one prefetched
            del self._loaded[old]
        self.stats["prefetches"] += 1
        self._loaded[k] = self._fetch(k)

    def _neighbour(self, k: int, step: int, wrap: bool) -> int | None:
        if k not in self._order:
            return None
        pos = self._order.index(k) + step
        if 0 <= pos < len(self._order):
            return self._order[pos]
        return self._order[pos % len(self._order)] if wrap else None

    @staticmethod
    def _in_backward() -> bool:
        # the graph task id is set while the autograd engine runs (torch.utils.checkpoint reads it the same way)
        return torch._C._current_graph_task_id() != -1

    # -- hooks
    def _model_pre_hook(self, module, args):
        if self._in_backward():
            return
        self._pass = []
        if self._backward_seen:
            self._passes_to_backprop, self._backward_seen = 0, False
        self._passes_to_backprop += int(torch.is_grad_enabled())
        first = self._order[0] if self._order else None
        for old in [j for j in self._loaded if j != first]:
            del self._loaded[old]
        self._prefetch(first)

    def _model_post_hook(self, module, args, output):
        if self._pass is not None and len(self._pass) == len(self._stores):
            self._order = self._pass
        self._pass = None
        return output

    def _pre_hook(self, k: int):
        def hook(block, args):
            store = self._stores[k]
            if store.entries and store.entries[0].original.device.type != "cpu":
                raise DistilleryError("blocks_to_swap", len(self._stores), f"block {store.name} was moved after "
                                      "block swap was enabled.", "call disable_block_swap(dit) before .to(), then "
                                      "enable it again.")
            if any(e.original.requires_grad for e in store.entries):
                raise DistilleryError("blocks_to_swap", len(self._stores), f"a swapped weight of block {store.name} "
                                      "was made trainable after block swap was enabled (its update would be lost).",
                                      "set requires_grad / inject LoRA first, then enable block swap.")
            backward = self._in_backward()
            if not backward and self._pass is not None:
                self._pass.append(k)
            fetch = self._loaded.pop(k, None)
            if fetch is None:
                fetch = self._fetch(k)
            else:
                self.stats["prefetch_hits"] += 1
            if fetch.event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(fetch.event)  # the compute stream waits for the copy; the host does not
                fetch.flat.record_stream(stream)  # its memory is not reused before queued kernels have read it
                self.stats["waits"] += 1
            views = self._stores[k].views(fetch.flat)
            for entry, view in zip(store.entries, views):
                getattr(entry.module, entry.table)[entry.name] = view
            self._in_use[k] = (fetch, views)
            if backward:
                self._backward_seen = True
                if self._order and k == self._order[0]:
                    self._passes_to_backprop -= 1
                # after the first swapped block, the last one again when an earlier forward is still to backprop
                self._prefetch(self._neighbour(k, -1, wrap=self._passes_to_backprop > 0))
            else:
                self._prefetch(self._neighbour(k, +1, wrap=not torch.is_grad_enabled()))
        return hook

    def _post_hook(self, k: int):
        def hook(block, args, output):
            fetch, _ = self._in_use.pop(k, (None, None))
            for entry in self._stores[k].entries:
                getattr(entry.module, entry.table)[entry.name] = entry.original
            # a training forward's last swapped block is the first one a checkpointed backward recomputes
            if (fetch is not None and torch.is_grad_enabled() and not self._in_backward() and self._order
                    and k == self._order[-1]):
                self._loaded[k] = fetch
            return output
        return hook

    # -- public
    @property
    def count(self) -> int:
        return len(self._stores)

    def place_resident(self, swapped_ids: set[int] | None = None) -> None:
        """Move every tensor of the model that is not a swapped block's master to the compute device: at enable,
        and after modules were added to a swapped model (e.g. a loss's own adapters, made on the CPU masters'
        device)."""
        if swapped_ids is None:
            swapped_ids = {id(e.original) for s in self._stores for e in s.entries}
        with torch.no_grad():
            for module in self.model.modules():
                for table in ("_parameters", "_buffers"):
                    for t in getattr(module, table).values():
                        if t is not None and id(t) not in swapped_ids and t.device != self.device:
                            t.data = t.data.to(self.device)

    def swapped_tensor_names(self, prefix: str = "") -> list[str]:
        """Names (`prefix` + the model's parameter and buffer names) of the tensors that live on the CPU: what
        DDP must ignore (`_ddp_params_and_buffers_to_ignore`)."""
        ids = {id(e.original) for s in self._stores for e in s.entries}
        named = [*self.model.named_parameters(remove_duplicate=False),
                 *self.model.named_buffers(remove_duplicate=False)]
        return [prefix + n for n, t in named if id(t) in ids]

    def swapped_parameter_names(self) -> list[str]:
        """Names (in `model.named_parameters()`) of the parameters that live on the CPU, e.g. for DDP's
        parameters to ignore."""
        ids = {id(e.original) for s in self._stores for e in s.entries if e.table == "_parameters"}
        return [n for n, p in self.model.named_parameters() if id(p) in ids]

    def host_bytes(self) -> int:
        return sum(s.host.numel() for s in self._stores)

    def disable(self, device=None) -> None:
        """Undo the swap: every tensor back on `device` (default: the compute device), hooks removed."""
        device = torch.device(device) if device is not None else self.device
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._loaded.clear()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        with torch.no_grad():
            for store in self._stores:
                for entry in store.entries:
                    getattr(entry.module, entry.table)[entry.name] = entry.original
                    entry.original.data = entry.original.data.to(device, copy=True)
        self._unpin()
        for store in self._stores:
            store.host = torch.empty(0, dtype=torch.uint8)
        self._stores.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)


def block_swap_of(dit: torch.nn.Module) -> BlockSwap | None:
    return getattr(base_model(dit), _ATTR, None)


def enable_block_swap(dit: torch.nn.Module, blocks_to_swap, device, *, plan=None, prefetch: bool = True) -> BlockSwap:
    """Swap `blocks_to_swap` blocks of `dit` (see the module docstring) and place the rest on `device`.

    `blocks_to_swap`: a whole number, or "auto" with `plan` (a `memory_plan.MemoryPlan` of this model and the run
    it is for): the fewest blocks whose plan fits the device's available memory (plus what the DiT already holds
    there). A swap already enabled is undone first."""
    model = base_model(dit)
    if blocks_to_swap == "auto":  # decided before anything moves: a refusal leaves the DiT as it was
        blocks_to_swap = auto_blocks_to_swap(model, device, plan)
    old = block_swap_of(model)
    if old is not None:
        old.disable(device)
    swap = BlockSwap(model, blocks_to_swap, device, prefetch=prefetch)
    setattr(model, _ATTR, swap)
    return swap


def copy_unswapped(dit: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `dit` without block swap (hooks and host buffers belong to the original): the swap is lifted
    while copying (swapped blocks' weights as plain CPU tensors, so nothing extra reaches the GPU) and put back on
    the same blocks. The copy's swapped blocks are on the CPU and the rest on the device: enable a swap on it, or
    move it."""
    import copy

    swap = block_swap_of(dit)
    if swap is None:
        return copy.deepcopy(dit)
    n, device, prefetch = swap.count, swap.device, swap.prefetch
    swap.disable("cpu")
    try:
        return copy.deepcopy(dit)
    finally:
        enable_block_swap(dit, n, device, prefetch=prefetch)


def disable_block_swap(dit: torch.nn.Module, device=None) -> None:
    """Undo `enable_block_swap` (a no-op when it is off): every tensor back on `device` (default: the compute
    device it was enabled with)."""
    swap = block_swap_of(dit)
    if swap is not None:
        swap.disable(device)


def auto_blocks_to_swap(dit: torch.nn.Module, device, plan) -> int:
    """The fewest blocks to swap for `plan` to fit `device`'s available memory (what the DiT already holds on it
    counts as available: it is placed again)."""
    from .weights_check import available_memory, gib

    if plan is None:
        raise DistilleryError("blocks_to_swap", "auto", "needs a memory plan of the run (resolution, batch, mode).",
                              "pass plan=memory_plan.memory_plan(...), or give a number of blocks.")
    device = torch.device(device)
    model = base_model(dit)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
               if t.device == device or (t.device.type == device.type == "cuda" and device.index is None))
    old = block_swap_of(model)
    if old is not None and device.type != "cpu":  # blocks swapped now come back before being swapped again
        held += sum(e.nbytes for s in old._stores for e in s.entries)
    budget = available_memory(device) + held
    n = plan.blocks_needed(budget)
    if n is None:
        least = plan.total(plan.max_swappable) + plan.reserve_bytes
        raise DistilleryError("blocks_to_swap", "auto", f"even with all {plan.max_swappable} blocks swapped the run "
                              f"needs about {gib(least)}; {device} has {gib(budget)}.",
                              "use an fp8 base, a lower resolution or batch, LoRA instead of full training, or "
                              "gradient checkpointing.")
    return n
