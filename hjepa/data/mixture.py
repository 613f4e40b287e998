"""Mixtures of named datasets and the sampler that draws from them: the one training path
(a single dataset trains as a one-component "concat" mixture).

What an epoch visits is `Mixture.epoch_stream(epoch)`, a pure function of (seed, epoch):
  weighted  each draw picks a component with probability w_d, then takes the next item of
            that component's own shuffled order;
  balanced  the same with equal draws per component;
  concat    the shuffled concatenation: every item once when epoch_length is the total.
A component's order is a seeded permutation per (epoch, pass), so no item repeats before
every other item of its component has been drawn that epoch. MixtureSampler shards the
stream over DDP ranks, resumes mid-epoch, and pairs each index with a key that seeds that
item's augmentation, so batches are identical whatever the number of loader workers.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterator, Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hjepa.data.batch import Batch, ImageDataset, Item
from hjepa.data.cache import ImageCache, augment_batch, check_caches
from hjepa.data.decode import UnreadableImageError
from hjepa.data.gpu_decode import check_decoders, decode_batch
from hjepa.errors import ConfigError, DataError

STRATEGIES = ("weighted", "balanced", "concat")


def normalize_weights(weights: dict[str, float]) -> dict[str, float]:
    """Weights scaled to sum to 1; ConfigError for negative, non-finite or all-zero weights."""
    if not weights:
        raise ConfigError("mixture weights: expected at least one component")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"mixture.components.{name}.weight: expected a finite number >= 0, got {w!r}")
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(f"mixture weights are all zero ({dict(weights)}): at least one must be positive")
    return {name: w / total for name, w in weights.items()}


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]) >> 1


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _passes(n_items: int, n_draws: int, *parts: int) -> torch.Tensor:
    """`n_draws` indices < n_items: seeded permutations one after the other (a fresh one per pass)."""
    orders = [torch.randperm(n_items, generator=_generator(*parts, p)) for p in range(-(-n_draws // n_items))]
    return torch.cat(orders)[:n_draws] if orders else torch.empty(0, dtype=torch.long)


class Mixture(Dataset):
    """Map-style dataset over the concatenation of named components.

    `mixture[i]` -> Item(image, label, source=component index); `mixture[(key, i)]`, as
    yielded by MixtureSampler, makes the item with torch's RNG seeded from `key` (and
    records the key in the Item). `to_device` turns a collated Batch into images on the
    training device, augmenting there the items of cached components. `weights` are the normalised shares of draws:
    the given weights for "weighted" (default: proportional to size), equal for "balanced",
    proportional to size for "concat" (given weights are still checked, then not used).
    """

    def __init__(
        self,
        datasets: dict[str, ImageDataset],
        weights: Optional[dict[str, float]] = None,
        strategy: Literal["weighted", "balanced", "concat"] = "weighted",
        epoch_length: Optional[int] = None,
        seed: int = 0,
    ):
        if not datasets:
            raise ConfigError("mixture: expected at least one component dataset")
        if strategy not in STRATEGIES:
            raise ConfigError(f"mixture.strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if seed < 0:
            raise ConfigError(f"mixture seed: expected an int >= 0, got {seed}")
        self.names = list(datasets)
        self.datasets = list(datasets.values())
        self.sizes = [len(d) for d in self.datasets]
        empty = [n for n, size in zip(self.names, self.sizes) if size == 0]
        if empty:
            raise DataError(f"mixture component(s) {', '.join(empty)} have no items")
        if weights is not None:
            unknown = [str(n) for n in weights if n not in datasets]
            missing = [n for n in self.names if n not in weights]
            problems = [f"unknown component(s) {', '.join(unknown)}"] if unknown else []
            problems += [f"no weight for {', '.join(missing)}"] if missing else []
            if problems:
                raise ConfigError(
                    f"mixture weights must name exactly the components ({', '.join(self.names)}): {'; '.join(problems)}"
                )
            shares = normalize_weights({n: weights[n] for n in self.names})
        # Only "weighted" draws by the given weights: the other strategies fix the shares.
        if strategy == "balanced":
            shares = {n: 1 / len(self.names) for n in self.names}
        elif strategy == "concat" or weights is None:
            shares = {n: size / sum(self.sizes) for n, size in zip(self.names, self.sizes)}
        self.weights = shares
        self.strategy = strategy
        self.seed = seed
        if epoch_length is not None and epoch_length < 1:
            raise ConfigError(f"mixture.epoch_length: expected a positive int or null, got {epoch_length}")
        self.epoch_length = epoch_length if epoch_length is not None else sum(self.sizes)
        self.offsets = [0, *np.cumsum(self.sizes).tolist()]  # component d holds [offsets[d], offsets[d+1])
        check_caches(self.names, self.caches)
        check_decoders(self.names, self.datasets)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int | tuple[int, int]) -> Item:
        if isinstance(index, tuple):
            key, index = index
            # The item's augmentation draws from torch's RNG (transforms.v2 uses nothing else):
            # seeding it per item makes the result independent of worker count and order.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(key)
                return self._item(index, key)
        return self._item(index)

    def _item(self, index: int, key: Optional[int] = None) -> Item:
        index = range(len(self))[index]
        d = bisect.bisect_right(self.offsets, index) - 1
        image, label = self.datasets[d][index - self.offsets[d]]
        return Item(image, int(label), d, key)

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """The batch on `device` with uint8 `images` (made there from `params` for cached
        components, decoded there for ``decode: gpu`` components), copied without waiting
        for the device."""
        if batch.params is not None:
            images = augment_batch(batch.params, batch.sources, self.caches, device)
        elif batch.encoded is not None:
            images = decode_batch(batch.encoded, device, lambda row, error: self._unreadable(batch, row, error))
        else:
            images = batch.images.to(device, non_blocking=True)
        return Batch(labels=batch.labels, sources=batch.sources, images=images,
                     context=batch.context.to(device, non_blocking=True),
                     targets=batch.targets.to(device, non_blocking=True))

    def _unreadable(self, batch: Batch, row: int, error: UnreadableImageError) -> None:
        """A file of a ``decode: gpu`` batch that no decoder reads: its dataset's on_error rule."""
        dataset = self.datasets[int(batch.sources[row])]
        if dataset.on_error == "raise":
            raise UnreadableImageError(f"{error} (on_error: skip would skip it)") from None
        dataset.note_skipped(error)

    @property
    def caches(self) -> list[Optional[ImageCache]]:
        return [d.cache for d in self.datasets]

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far, over all components (and all loader workers)."""
        return sum(d.num_skipped for d in self.datasets)

    def stats(self) -> dict[str, dict[str, float]]:
        """Per component: size, normalised weight and expected draws per epoch."""
        return {
            name: {"size": size, "weight": self.weights[name], "expected_draws": self.weights[name] * self.epoch_length}
            for name, size in zip(self.names, self.sizes)
        }

    def epoch_stream(self, epoch: int) -> torch.Tensor:
        """The global indices epoch `epoch` visits, in order: a pure function of (seed, epoch)."""
        n = self.epoch_length
        if self.strategy == "concat":
            return _passes(len(self), n, self.seed, epoch, 0)
        g = _generator(self.seed, epoch, 1)
        if self.strategy == "weighted":
            w = torch.tensor([self.weights[name] for name in self.names], dtype=torch.float64)
            components = torch.multinomial(w, n, replacement=True, generator=g)
        else:  # balanced: equal draws (the first n % D components get one more), in shuffled order
            counts = torch.tensor([n // len(self.names) + (d < n % len(self.names)) for d in range(len(self.names))])
            components = torch.repeat_interleave(torch.arange(len(self.names)), counts)[torch.randperm(n, generator=g)]
        stream = torch.empty(n, dtype=torch.long)
        for d, size in enumerate(self.sizes):
            where = (components == d).nonzero().squeeze(1)
            stream[where] = self.offsets[d] + _passes(size, len(where), self.seed, epoch, 2, d)
        return stream


class MixtureSampler(Sampler):
    """Yields (key, global index) for one DDP rank.

    The epoch stream is truncated to a multiple of `world_size` and rank r takes positions
    r, r + W, r + 2W, ... `key` = a seed-derived offset + epoch * 2**40 + global position
    (mod 2**63): deterministic, and unique within a run for epochs < 2**23 of < 2**40 items.
    `position` is how many items this rank has consumed in the epoch (the trainer sets it
    from its step counter, since loader workers prefetch ahead of consumption).
    """

    def __init__(self, mixture: Mixture, seed: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"sampler: expected 0 <= rank < world_size, got rank {rank} of {world_size}")
        if seed < 0:
            raise ConfigError(f"sampler seed: expected an int >= 0, got {seed}")
        self.mixture, self.rank, self.world_size = mixture, rank, world_size
        self.per_rank = mixture.epoch_length // world_size
        if self.per_rank == 0:
            raise ConfigError(f"epoch of {mixture.epoch_length} items is shorter than the world size {world_size}")
        self._key_offset = _seed(seed, 3)
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning, unless it is the epoch already set (so that
        a sampler resumed by load_state_dict keeps its position through the trainer's usual
        set_epoch call)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def set_position(self, n: int) -> None:
        if not 0 <= n <= self.per_rank:
            raise ValueError(f"sampler position {n} outside the epoch of {self.per_rank} items per rank")
        self.position = n

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.set_position(int(state["position"]))

    def __len__(self) -> int:
        return self.per_rank - self.position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        w = self.world_size
        stream = self.mixture.epoch_stream(self.epoch)[: self.per_rank * w]
        first = self.rank + self.position * w
        base = self._key_offset + self.epoch * 2**40
        for pos, index in zip(range(first, len(stream), w), stream[first::w].tolist()):
            yield (base + pos) % 2**63, index

