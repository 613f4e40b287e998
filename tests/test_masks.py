"""The multi-block mask collator: shapes, semantics, determinism, unbiased equal lengths."""

import pytest
import torch

from hjepa.data.batch import Item
from hjepa.errors import ConfigError
from hjepa.masks import MultiBlockMaskCollator

GRIDS = [(8, 8), (14, 14)]


def collator(grid, **kwargs) -> MultiBlockMaskCollator:
    kwargs.setdefault("min_keep", 4 if grid == (8, 8) else 10)
    return MultiBlockMaskCollator(grid, **kwargs)


def sample(c: MultiBlockMaskCollator, batch_size=32, seed=0):
    return c.sample(batch_size, torch.Generator().manual_seed(seed))


def as_mask(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(index.shape[0], n, dtype=torch.bool).scatter_(1, index.reshape(index.shape[0], -1), True)


@pytest.mark.parametrize("grid", GRIDS)
def test_shapes_ranges_and_block_geometry(grid):
    c = collator(grid)
    n = grid[0] * grid[1]
    for seed in range(5):
        context, targets = sample(c, seed=seed)
        assert context.dtype == targets.dtype == torch.long
        B, T, M = targets.shape
        assert (B, T) == (32, 4) and context.shape[0] == 32
        for index in (context, targets):
            assert index.min() >= 0 and index.max() < n
        # context rows: sorted, no repeats
        assert (context[:, 1:] > context[:, :-1]).all()
        # each target block is one h x w rectangle of the grid, the same shape for the batch
        rows, cols = targets // grid[1], targets % grid[1]
        h = int(rows[0, 0].max() - rows[0, 0].min() + 1)
        w = int(cols[0, 0].max() - cols[0, 0].min() + 1)
        assert h * w == M
        top, left = rows.min(-1, keepdim=True).values, cols.min(-1, keepdim=True).values
        expected = (top + torch.arange(h).repeat_interleave(w)) * grid[1] + left + torch.arange(w).repeat(h)
        assert torch.equal(targets, expected)


@pytest.mark.parametrize("grid", GRIDS)
def test_context_is_disjoint_from_targets_and_keeps_min_keep(grid):
    n = grid[0] * grid[1]
    min_keep = 16 if grid == (8, 8) else 40
    c = collator(grid, min_keep=min_keep)
    for seed in range(5):
        blocks, targets = c.sample_blocks(64, torch.Generator().manual_seed(seed))
        assert (blocks.sum(1) >= min_keep).all()
        context, targets = sample(c, 64, seed)
        assert context.shape[1] >= min_keep
        assert not (as_mask(context, n) & as_mask(targets, n)).any()


def test_allow_overlap_keeps_the_whole_context_block():
    c = collator((14, 14), allow_overlap=True)
    context, targets = sample(c, 64)
    assert (as_mask(context, 196) & as_mask(targets, 196)).any()
    rows, cols = context // 14, context % 14  # the whole block: a full rectangle
    h = rows.max(1).values - rows.min(1).values + 1
    w = cols.max(1).values - cols.min(1).values + 1
    assert torch.equal(h * w, torch.full_like(h, context.shape[1]))


@pytest.mark.parametrize("grid", GRIDS)
def test_seeded_generator_is_deterministic(grid):
    c = collator(grid)
    a, b, other = sample(c, seed=7), sample(c, seed=7), sample(c, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (a[0].shape == other[0].shape and torch.equal(a[0], other[0]))


def test_equal_lengths_keep_a_uniform_subset_without_spatial_bias():
    """Truncating to the batch minimum K must not favour any rows: every kept patch is a
    uniform draw from its image's context, so the expected kept count per grid row is
    sum_i K / n_i * (context patches of image i in that row). The reference's "first K
    indices" truncation, computed alongside, drops the bottom rows and fails the same check."""
    c, grid = collator((14, 14)), 14
    kept_rows, expected_rows, first_k_rows = torch.zeros(grid), torch.zeros(grid), torch.zeros(grid)
    for seed in range(40):
        blocks, _ = c.sample_blocks(128, torch.Generator().manual_seed(seed))
        context, _ = c.sample(128, torch.Generator().manual_seed(seed))  # same blocks, then the subset
        assert (blocks.gather(1, context)).all()  # kept patches come from each image's own context
        k, sizes = context.shape[1], blocks.sum(1, keepdim=True)
        kept_rows += torch.bincount((context // grid).flatten(), minlength=grid)
        expected_rows += (blocks.float() * k / sizes).view(-1, grid, grid).sum((0, 2))
        first_k = blocks.float().cumsum(1) <= k  # the reference: first K in raster order
        first_k_rows += (blocks & first_k).view(-1, grid, grid).sum((0, 2))
    used = expected_rows > 200  # rows with enough context patches to compare
    ratio = kept_rows[used] / expected_rows[used]
    assert (ratio - 1).abs().max() < 0.03, ratio
    biased = first_k_rows[used] / expected_rows[used]
    assert biased[:3].mean() > 1.3 and biased[-3:].mean() < 0.7  # the check would catch it


def test_blocks_reach_every_row_and_column():
    """Offsets 0..H-h are all possible (the reference never touches the last row/column)."""
    c = collator((8, 8))
    seen_targets, seen_context = torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool)
    for seed in range(10):
        context, targets = sample(c, 64, seed)
        seen_targets |= as_mask(targets, 64).any(0)
        seen_context |= as_mask(context, 64).any(0)
    assert seen_targets.all() and seen_context.all()


def test_collate_items_with_and_without_keys():
    c = collator((8, 8))
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    keyed = [Item(image, i % 10, i % 2, 1000 + i) for i in range(6)]
    batch = c(keyed)
    assert batch.images.shape == (6, 3, 32, 32) and batch.images.dtype == torch.uint8 and batch.params is None
    assert batch.labels.tolist() == [0, 1, 2, 3, 4, 5] and batch.sources.tolist() == [0, 1, 0, 1, 0, 1]
    assert batch.labels.dtype == batch.sources.dtype == torch.long
    # the masks are a function of the first item's key, not of global RNG state or worker
    torch.manual_seed(123)
    again = c(keyed)
    assert torch.equal(batch.context, again.context) and torch.equal(batch.targets, again.targets)
    expected = c.sample(6, torch.Generator().manual_seed(1000))
    assert torch.equal(batch.context, expected[0]) and torch.equal(batch.targets, expected[1])

    plain = c([Item(image, 3, 0)] * 4)
    assert plain.sources.tolist() == [0, 0, 0, 0] and plain.targets.shape[:2] == (4, 4)
    torch.manual_seed(5)
    first = c([Item(image, 3, 0)] * 4)
    torch.manual_seed(5)
    assert torch.equal(c([Item(image, 3, 0)] * 4).context, first.context)  # without keys: the global RNG


@pytest.mark.parametrize(
    "grid, kwargs",
    [
        ((2, 2), {}),  # a target block of 0.15 x 4 patches is empty
        ((8, 8), {"min_keep": 100}),  # more than the grid holds
        ((8, 8), {"target_scale": [0.3, 0.2]}),
        ((8, 8), {"target_scale": [0.0, 0.2]}),
        ((8, 8), {"context_scale": [0.85, 1.5]}),
        ((8, 8), {"target_aspect": [-1.0, 1.0]}),
        ((8, 8), {"target_aspect": [1.0]}),
        ((8, 8), {"num_targets": 0}),
        ((8, 8), {"min_keep": 0}),
    ],
)
def test_invalid_configs_raise_config_error(grid, kwargs):
    with pytest.raises(ConfigError, match="mask"):
        MultiBlockMaskCollator(grid, **kwargs)


def test_unsatisfiable_min_keep_raises_config_error_when_sampling():
    c = MultiBlockMaskCollator((8, 8), num_targets=8, target_scale=[0.5, 0.5], min_keep=40)
    with pytest.raises(ConfigError, match="min_keep"):
        sample(c)
