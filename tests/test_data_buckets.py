"""Aspect buckets: same-size batches, deterministic shuffles, mid-epoch resume, disjoint shards, repeat."""

import json
from collections import Counter

import pytest
import torch

from dit_distillery.data import BucketBatchSampler
from dit_distillery.errors import DistilleryError

SIZES = [(32, 32)] * 7 + [(32, 48)] * 5 + [(48, 32)] * 3 + [(16, 64)]


def flat(batches):
    return [i for b in batches for i in b]


def test_batches_are_same_size_and_cover_the_epoch():
    sampler = BucketBatchSampler(SIZES, batch_size=3, seed=1)
    batches = list(sampler)
    assert all(len({SIZES[i] for i in b}) == 1 for b in batches)
    assert sorted(flat(batches)) == list(range(len(SIZES)))  # every sample once
    assert len(batches) == len(sampler) == 3 + 2 + 1 + 1     # partial batches kept
    dropped = BucketBatchSampler(SIZES, batch_size=3, seed=1, drop_last=True)
    assert all(len(b) == 3 for b in dropped) and len(dropped) == 2 + 1 + 1


def test_deterministic_from_seed_and_epoch():
    a, b = BucketBatchSampler(SIZES, 2, seed=5), BucketBatchSampler(SIZES, 2, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b)
    a.set_epoch(0)
    assert epoch1 != list(a)                                       # a new epoch reshuffles
    assert list(BucketBatchSampler(SIZES, 2, seed=6)) != list(BucketBatchSampler(SIZES, 2, seed=5))
    ordered = list(BucketBatchSampler(SIZES, 2, shuffle=False))
    assert flat(ordered) == sorted(range(len(SIZES)), key=lambda i: (SIZES[i], i))


def test_resume_mid_epoch_through_json_state():
    sampler = BucketBatchSampler(SIZES, 2, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    state = json.loads(json.dumps(sampler.state(epoch=4, batches_done=3)))  # as the trainer checkpoints it
    fresh = BucketBatchSampler(SIZES, 2, seed=3)
    assert fresh.resume(state) == 4
    assert list(fresh) == full[3:]
    assert list(fresh) == full                                     # the start applies to that one pass only
    done = fresh.state(epoch=4, batches_done=len(full))
    assert fresh.resume(done) == 5 and list(fresh) == fresh.batches(5)  # a finished epoch resumes at the next
    with pytest.raises(DistilleryError, match="another dataset or batch settings"):
        BucketBatchSampler(SIZES, 3, seed=3).resume(state)
    with pytest.raises(DistilleryError, match="start"):
        fresh.set_epoch(0, start=99)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_and_equal_length(world_size):
    sizes = [(32, 32)] * 20 + [(64, 32)] * 9
    samplers = [BucketBatchSampler(sizes, 2, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in (0, 1):
        per_rank = []
        for s in samplers:
            s.set_epoch(epoch)
            per_rank.append(list(s))
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])  # same step count
        seen = Counter(flat(flat(per_rank)))
        assert max(seen.values()) == 1                             # no sample on two ranks
        global_batches = samplers[0].global_batches(epoch)
        assert flat(per_rank[0]) == flat(global_batches[0::world_size])


def test_repeat_and_dataloader():
    sizes = [(16, 16)] * 3 + [(16, 32)] * 2
    sampler = BucketBatchSampler(sizes, 2, seed=0, repeat=3)
    assert Counter(flat(sampler)) == {i: 3 for i in range(5)}

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(sizes)

        def __getitem__(self, i):
            return torch.zeros(1, *sizes[i])

    loader = torch.utils.data.DataLoader(Items(), batch_sampler=sampler)
    shapes = [tuple(batch.shape[-2:]) for batch in loader]
    assert len(shapes) == len(sampler) and set(shapes) == {(16, 16), (16, 32)}


def test_bad_arguments():
    with pytest.raises(DistilleryError, match="batch_size"):
        BucketBatchSampler(SIZES, 0)
    with pytest.raises(DistilleryError, match="rank"):
        BucketBatchSampler(SIZES, 1, rank=2, world_size=2)
    with pytest.raises(DistilleryError, match="fewer than the 4 process"):
        BucketBatchSampler([(16, 16)] * 3, 8, world_size=4)
    with pytest.raises(DistilleryError, match="empty"):
        BucketBatchSampler([], 1)
