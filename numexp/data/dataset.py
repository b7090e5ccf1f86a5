"""The :class:`Dataset` container and :func:`assemble`, the steps every loader ends with."""
from dataclasses import dataclass

import numpy as np

from numexp.data import splits
from numexp.data.images import channel_stats, normalize, resize_array, transform_images


@dataclass(repr=False, eq=False)
class Dataset:
    """Normalised train/val/test splits plus what is needed to preprocess new images.

    Attributes:
        x_train, x_val, x_test: (N, C, H, W) float32, ``(pixel_in_[0,1] - mean) / std``.
        y_train, y_val, y_test: (N,) int64 labels in ``[0, num_classes)``.
        mean, std: (C,) float32, per-channel statistics of the training split in [0, 1] units.
        class_names: one name per label.
        name: the registry name (``"gtsrb"``).
        info: plain python values describing the splits, root and options, for logging.
        groups_train, groups_val: (N, K) int64 keys the validation split kept together
            (GTSRB: (ClassId, track)); None for per-sample splits.
    """
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    class_names: list
    info: dict
    groups_train: np.ndarray = None
    groups_val: np.ndarray = None

    @property
    def in_shape(self):
        """(C, H, W) of one image, as python ints."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self):
        return len(self.class_names)

    def transform(self, images):
        """:func:`numexp.data.transform_images` with this data set's size, channels, mean, std."""
        channels, size, _ = self.in_shape
        return transform_images(images, size, channels, self.mean, self.std)

    def __repr__(self):
        return (f"Dataset(name={self.name!r}, in_shape={self.in_shape}, num_classes={self.num_classes}, "
                f"train={len(self.y_train)}, val={len(self.y_val)}, test={len(self.y_test)})")


def assemble(name, pool, test, class_names, *, scale, val_fraction, seed, fraction=1.0,
             groups=None, size=None, info=None):
    """Subset, split off validation, resize, normalise with training statistics.

    Args:
        pool: (x, y) the training data validation is taken from; x (N, C, H, W) uint8 or float.
        test: (x, y) the test split.
        scale: factor to [0, 1] units (1/255 for uint8 pixels, 1/16 for sklearn digits).
        fraction: stratified subset kept of pool (seeded) and of test (fixed seed).
        groups: (N,) or (N, K) keys kept together in the validation split (GTSRB tracks);
            None for a per-sample stratified split.
        size: resize with :func:`resize_array` (array data sets); None keeps the size.
        info: loader-specific entries; split sizes and shapes are added.
    """
    (x_pool, y_pool), (x_test, y_test) = pool, test
    if fraction < 1.0:
        keep = splits.stratified_subset(y_pool, fraction, splits.subset_rng(seed))
        x_pool, y_pool = x_pool[keep], y_pool[keep]
        groups = None if groups is None else np.asarray(groups)[keep]
        keep = splits.stratified_subset(y_test, fraction, splits.test_subset_rng())
        x_test, y_test = x_test[keep], y_test[keep]
    if groups is None:
        train, val = splits.stratified_split(y_pool, val_fraction, splits.val_rng(seed))
    else:
        train, val = splits.group_split(y_pool, groups, val_fraction, splits.val_rng(seed))
    raw = {"train": (x_pool[train], y_pool[train]), "val": (x_pool[val], y_pool[val]),
           "test": (x_test, y_test)}
    raw = {k: (resize_array(x, size), y) for k, (x, y) in raw.items()}
    mean, std = channel_stats(raw["train"][0], scale)
    out = {k: (normalize(x, mean, std, scale), np.asarray(y, dtype=np.int64)) for k, (x, y) in raw.items()}
    ds = Dataset(name, *out["train"], *out["val"], *out["test"], mean=mean, std=std,
                 class_names=list(class_names), info={})
    if groups is not None:
        groups = np.asarray(groups, dtype=np.int64).reshape(len(y_pool), -1)
        ds.groups_train, ds.groups_val = groups[train], groups[val]
    ds.info = {"dataset": name, **(info or {}),
               "sizes": {k: int(len(y)) for k, (_, y) in out.items()},
               "in_shape": list(ds.in_shape), "num_classes": ds.num_classes,
               "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return ds
