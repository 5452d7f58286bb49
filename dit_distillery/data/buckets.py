"""Aspect-ratio buckets: batches whose samples share one (height, width), so batch size > 1 works with dynamic
resolution (DiffSynth trains at batch size 1 partly because mixed sizes cannot be stacked).

`BucketBatchSampler` is a torch batch sampler (`DataLoader(dataset, batch_sampler=...)`). Each epoch's batches
depend only on (seed, epoch), so every process computes the same global list and takes its own share: batch
`b` goes to rank `b % world_size`, and the list is cut to a multiple of `world_size` so all ranks run the same
number of steps (DDP hangs otherwise) while never seeing the same batch. A run resumes mid-epoch from the
number of batches it had consumed (`state` / `resume`): the sampler cannot count that itself, because a
DataLoader prefetches ahead of what training actually used.

Shard here or in accelerate, not both: give each process its (rank, world_size) and keep the DataLoader out of
`accelerator.prepare` (whose `BatchSamplerShard` would split the batches again and pad by repeating samples), or
leave rank=0, world_size=1 and let accelerate shard.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import DistilleryError


class BucketBatchSampler(torch.utils.data.Sampler):
    """Same-size batches, shuffled deterministically from (seed, epoch), sharded by (rank, world_size)."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, repeat: int = 1, rank: int = 0, world_size: int = 1):
        for name, value, low in (("batch_size", batch_size, 1), ("repeat", repeat, 1), ("world_size", world_size, 1)):
            if not isinstance(value, int) or value < low:
                raise DistilleryError(name, value, f"must be an integer >= {low}.", f"set {name} to 1 or more.")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DistilleryError("rank", rank, f"must be in [0, {world_size}).", "pass the process index.")
        if not len(sizes):
            raise DistilleryError("sizes", [], "the dataset is empty.", "add samples to the dataset.")
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.repeat, self.rank, self.world_size = repeat, rank, world_size
        self.groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, size in enumerate(self.sizes):
            self.groups[size].append(index)
        self.groups = dict(sorted(self.groups.items()))
        per_group = [len(g) * repeat for g in self.groups.values()]
        total = sum(n // batch_size if drop_last else -(-n // batch_size) for n in per_group)
        self._per_rank = total // world_size
        if self._per_rank == 0:
            raise DistilleryError("batch_size", batch_size, f"{sum(per_group)} samples in {len(per_group)} size "
                                  f"bucket(s) make {total} batch(es), fewer than the {world_size} process(es).",
                                  "use a smaller batch size, fewer processes, drop_last=False or a larger repeat.")
        self.epoch = 0
        self.start = 0

    # -- the schedule
    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch`, for all ranks, in the order they are handed out."""
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        batches = []
        for members in self.groups.values():
            order = []
            for _ in range(self.repeat):  # each pass is its own permutation, as a repeated dataset would be
                order.extend(members if rng is None else [members[i] for i in rng.permutation(len(members))])
            for i in range(0, len(order), self.batch_size):
                batch = order[i:i + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches[:self._per_rank * self.world_size]

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`."""
        return self.global_batches(epoch)[self.rank::self.world_size]

    # -- torch Sampler protocol
    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch (call before each); `start` skips the first batches (resuming mid-epoch)."""
        if not 0 <= start <= self._per_rank:
            raise DistilleryError("start", start, f"must be in [0, {self._per_rank}].",
                                  "pass the number of batches already consumed this epoch.")
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0  # a resume position applies to one pass only
        yield from self.batches(self.epoch)[start:]

    def __len__(self) -> int:
        """Batches per epoch for this rank (the full epoch, whatever `start` is)."""
        return self._per_rank

    # -- checkpointing the data position
    def fingerprint(self) -> str:
        """Identifies the schedule: a saved position only makes sense for the same data and settings."""
        spec = [self.sizes, self.batch_size, self.seed, self.shuffle, self.drop_last, self.repeat, self.world_size]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    def state(self, epoch: int, batches_done: int) -> dict:
        """The JSON-able data position after `batches_done` batches of `epoch` were trained on."""
        return {"epoch": int(epoch), "batches_done": int(batches_done), "fingerprint": self.fingerprint()}

    def resume(self, state: dict) -> int:
        """Continue from a saved position; returns the epoch to run (the next one if that epoch was complete)."""
        if state.get("fingerprint") != self.fingerprint():
            raise DistilleryError("data position", state, "it was saved for another dataset or batch settings "
                                  "(samples, sizes, batch size, seed, repeat or process count changed).",
                                  "resume with the same dataset and settings, or start a new run.")
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= self._per_rank:
            epoch, done = epoch + 1, 0
        self.set_epoch(epoch, done)
        return epoch
