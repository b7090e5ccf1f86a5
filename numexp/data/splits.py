"""Seeded, stratified subsets and splits, vectorised over samples.

Every random choice draws from its own stream ``np.random.default_rng([stream, seed])``, so
changing ``fraction`` does not move the validation split's seed and vice versa. Test-side
choices (test split, test subset) use the fixed seed :data:`TEST_SEED`: every run of a seed
sweep is scored on the same test images.
"""
import numpy as np

TEST_SEED = 0
_SUBSET, _VAL, _TEST_SPLIT, _TEST_SUBSET = 1, 2, 3, 4


def subset_rng(seed):
    return np.random.default_rng([_SUBSET, int(seed)])


def val_rng(seed):
    return np.random.default_rng([_VAL, int(seed)])


def test_split_rng():
    return np.random.default_rng([_TEST_SPLIT, TEST_SEED])


def test_subset_rng():
    return np.random.default_rng([_TEST_SUBSET, TEST_SEED])


def _class_ranks(y, rng):
    """Random order grouped by class, each sample's rank inside its class, and class sizes.

    Shape:
        y: (N,) -> order: (N,) indices, rank: (N,) rank of order[i], count: (N,) size of
        order[i]'s class.
    """
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]
    _, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    rank = np.arange(len(y)) - np.repeat(starts, counts)
    return order, rank, np.repeat(counts, counts)


def stratified_subset(y, fraction, rng):
    """Sorted indices of ``round(fraction * n_c)`` random samples per class (at least one).

    Shape:
        y: (N,) int labels -> (M,) int64 indices.
    """
    if fraction >= 1.0:
        return np.arange(len(y), dtype=np.int64)
    order, rank, count = _class_ranks(np.asarray(y), rng)
    keep = np.maximum(1, np.floor(fraction * count + 0.5))
    return np.sort(order[rank < keep]).astype(np.int64)


def stratified_split(y, fraction, rng):
    """Split off ``round(fraction * n_c)`` random samples per class, never a class's last one.

    Returns:
        keep, held: sorted int64 index arrays partitioning ``range(len(y))``.
    """
    y = np.asarray(y)
    if fraction <= 0.0 or len(y) == 0:
        return np.arange(len(y), dtype=np.int64), np.zeros(0, dtype=np.int64)
    order, rank, count = _class_ranks(y, rng)
    n_held = np.minimum(np.floor(fraction * count + 0.5), count - 1)
    held = rank < n_held
    return np.sort(order[~held]).astype(np.int64), np.sort(order[held]).astype(np.int64)


def group_split(y, groups, fraction, rng):
    """Like :func:`stratified_split`, but whole groups (e.g. GTSRB tracks) move together.

    Groups are split per class, so each class with two or more groups gets some in both
    parts; the held fraction is then approximate in samples.

    Args:
        y: (N,) labels; groups: (N,) or (N, K) group keys (rows compared whole), one class
            per group.

    Returns:
        keep, held: sorted int64 index arrays; no group has samples in both.
    """
    _, first, inverse = np.unique(np.asarray(groups), axis=0, return_index=True,
                                   return_inverse=True)
    _, held_groups = stratified_split(np.asarray(y)[first], fraction, rng)
    held = np.isin(inverse.ravel(), held_groups)
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)
