"""Mixture strategies, the epoch stream, DDP sharding, mid-epoch resume and key-seeded
augmentation; and the CIFAR-10 JPEGs trained through a mixture."""

import bisect

import pytest
import torch
from torch.utils.data import DataLoader

from hjepa.data.folder import ImageFolder
from hjepa.data.mixture import Mixture, MixtureSampler, normalize_weights
from hjepa.data.synthetic import SyntheticShapes
from hjepa.data.transforms import train_transform

SIZES = {"big": 1000, "mid": 300, "small": 50}


def _datasets(transform=None):
    return {name: SyntheticShapes("train", transform, num_train=n) for name, n in SIZES.items()}


def _component_counts(mix, stream):
    counts = [0] * len(mix.names)
    for i in stream.tolist():
        counts[bisect.bisect_right(mix.offsets, i) - 1] += 1
    return counts


def _augment():
    return train_transform(24, [0.3, 1.0], [0.75, 1.333], 0.5, 0.4)


def test_weighted_draws_match_the_weights():
    mix = Mixture(_datasets(), {"big": 6, "mid": 3, "small": 1}, "weighted", epoch_length=30000, seed=3)
    assert mix.weights == pytest.approx({"big": 0.6, "mid": 0.3, "small": 0.1})
    counts = _component_counts(mix, mix.epoch_stream(0))
    expected = [0.6 * 30000, 0.3 * 30000, 0.1 * 30000]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    stats = mix.stats()
    assert stats["small"] == {"size": 50, "weight": pytest.approx(0.1), "expected_draws": pytest.approx(3000)}


def test_each_component_is_drawn_in_passes_without_repeats():
    mix = Mixture(_datasets(), {"big": 1, "mid": 1, "small": 8}, epoch_length=5000)
    stream = mix.epoch_stream(0).tolist()
    small = [i for i in stream if i >= mix.offsets[2]]
    assert len(small) > 4 * 50
    for p in range(len(small) // 50):  # every pass over the 50 items is a permutation
        assert sorted(small[50 * p:50 * p + 50]) == list(range(mix.offsets[2], mix.offsets[3]))
    assert small[:50] != small[50:100]  # reshuffled for each pass


def test_balanced_draws_are_equal_and_concat_visits_every_item_once():
    balanced = Mixture(_datasets(), strategy="balanced", epoch_length=3001)
    counts = _component_counts(balanced, balanced.epoch_stream(0))
    assert sum(counts) == 3001 and max(counts) - min(counts) <= 1
    assert [s["weight"] for s in balanced.stats().values()] == pytest.approx([1 / 3] * 3)

    concat = Mixture(_datasets(), strategy="concat")
    stream = concat.epoch_stream(0)
    assert concat.epoch_length == len(concat) == 1350
    assert sorted(stream.tolist()) == list(range(1350))
    assert stream.tolist() != list(range(1350))  # shuffled
    assert [s["expected_draws"] for s in concat.stats().values()] == pytest.approx([1000, 300, 50])
    assert Mixture(_datasets()).epoch_length == 1350  # default epoch: the summed sizes


def test_stream_is_a_pure_function_of_seed_and_epoch():
    for strategy in ("weighted", "balanced", "concat"):
        a, b = Mixture(_datasets(), strategy=strategy, seed=7), Mixture(_datasets(), strategy=strategy, seed=7)
        assert torch.equal(a.epoch_stream(4), b.epoch_stream(4))
        assert torch.equal(a.epoch_stream(4), a.epoch_stream(4))
        assert not torch.equal(a.epoch_stream(4), a.epoch_stream(5))
        assert not torch.equal(a.epoch_stream(4), Mixture(_datasets(), strategy=strategy, seed=8).epoch_stream(4))


def test_two_ranks_are_disjoint_and_cover_the_epoch():
    mix = Mixture(_datasets(), epoch_length=1001)  # odd: truncated to 1000 for 2 ranks
    stream = mix.epoch_stream(2).tolist()
    ranks = [MixtureSampler(mix, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    items = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [len(i) for i in items] == [500, 500]
    keys = [k for rank in items for k, _ in rank]
    assert len(set(keys)) == 1000 and all(0 <= k < 2**63 for k in keys)  # unique, one per position
    # Interleaved, the two ranks give back exactly the truncated stream: disjoint positions, full cover.
    assert [i for pair in zip(*items) for _, i in pair] == stream[:1000]
    one = MixtureSampler(mix, seed=0)
    one.set_epoch(2)
    assert [i for _, i in one] == stream  # a single rank takes everything
    next_epoch = MixtureSampler(mix, seed=0, rank=0, world_size=2)
    next_epoch.set_epoch(3)
    assert not set(keys) & {k for k, _ in next_epoch}  # keys never repeat within a run


def test_resume_mid_epoch_yields_exactly_the_remaining_items():
    mix = Mixture(_datasets(), {"big": 1, "mid": 1, "small": 1}, seed=1)
    full = MixtureSampler(mix, seed=5, rank=1, world_size=2)
    full.set_epoch(1)
    everything = list(full)
    resumed = MixtureSampler(mix, seed=5, rank=1, world_size=2)
    resumed.load_state_dict({"epoch": 1, "position": 123})
    resumed.set_epoch(1)  # the trainer's usual call keeps the resumed position
    assert resumed.state_dict() == {"epoch": 1, "position": 123}
    assert len(resumed) == len(everything) - 123
    assert list(resumed) == everything[123:]
    resumed.set_epoch(2)
    assert resumed.state_dict() == {"epoch": 2, "position": 0}
    resumed.set_position(10)
    fresh = MixtureSampler(mix, seed=5, rank=1, world_size=2)
    fresh.set_epoch(2)
    assert list(resumed) == list(fresh)[10:]


def test_items_report_their_component_and_keys_seed_the_augmentation():
    mix = Mixture(_datasets(_augment()))
    item = mix[1000 + 7]
    assert (item.source, item.label, item.key) == (1, 7 % 10, None) and item.image.shape == (3, 24, 24)
    state = torch.get_rng_state()
    first = mix[(12345, 1007)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert (first.label, first.source, first.key) == (7, 1, 12345)
    assert torch.equal(mix[(12345, 1007)].image, first.image)
    assert not torch.equal(mix[(54321, 1007)].image, first.image)


def test_batches_do_not_depend_on_the_number_of_workers():
    mix = Mixture(_datasets(_augment()), {"big": 1, "mid": 1, "small": 1})

    def batches(workers):
        sampler = MixtureSampler(mix, seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(mix, batch_size=16, sampler=sampler, num_workers=workers)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == 4:
                return out

    for a, b in zip(batches(0), batches(2)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cifar10_jpegs_through_a_mixture(cifar10_train):
    cifar = ImageFolder(str(cifar10_train), "train", transform=train_transform(32, [0.8, 1.0], [0.75, 1.333], 0.5, 0.1),
                        holdout=500)
    shapes = SyntheticShapes("train", train_transform(32, [0.8, 1.0], [0.75, 1.333], 0.5, 0.1), num_train=2000)
    mix = Mixture({"cifar10": cifar, "shapes": shapes}, {"cifar10": 0.75, "shapes": 0.25}, epoch_length=256)
    sampler = MixtureSampler(mix, seed=0)
    batch = next(iter(DataLoader(mix, batch_size=256, sampler=sampler)))
    assert batch.image.dtype == torch.uint8 and batch.image.shape == (256, 3, 32, 32)
    assert 150 < (batch.source == 0).sum() < 230 and batch.label.min() >= 0 and batch.label.max() <= 9
    assert mix.num_skipped == 0 and mix.stats()["cifar10"]["size"] == 45000
    single = Mixture({"cifar10": cifar}, strategy="concat")  # a plain dataset trains the same way
    assert len(MixtureSampler(single, seed=0)) == 45000


def test_normalize_weights():
    assert normalize_weights({"a": 3, "b": 1.0, "c": 0}) == {"a": 0.75, "b": 0.25, "c": 0.0}
