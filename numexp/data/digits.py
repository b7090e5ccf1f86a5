"""scikit-learn's bundled 8x8 handwritten digits (no download)."""
import importlib.util
from pathlib import Path

import numpy as np

from numexp.data import splits
from numexp.data.base import check_common
from numexp.data.dataset import assemble


def load_digits(root=None, *, size=None, val_fraction=0.1, test_fraction=0.2, seed=0, fraction=1.0):
    """sklearn's digits: 1,797 grey 8x8 images of 0..9, pixel values 0..16 scaled by 1/16.

    The test split is stratified with the fixed seed ``splits.TEST_SEED`` (the same test
    images whatever ``seed``); validation is then split off the rest with ``seed``.

    Args:
        root: ignored (the data ship with scikit-learn); accepted so every loader takes it.
        size: upsample to ``size`` x ``size`` with Pillow's bilinear weights in float32
            (:func:`numexp.data.images.resize_array`), e.g. 28 for LeNet-5; None keeps 8x8.
        test_fraction: stratified share of all images used as test set.
        val_fraction, seed, fraction: as in :func:`numexp.data.load`.

    Shape:
        x_*: (N, 1, size, size) float32; class names "0".."9".
    """
    check_common(val_fraction, seed, fraction, size, test_fraction=test_fraction)
    images, target = _read_digits()
    x = images.astype(np.float32)[:, None]
    y = target.astype(np.int64)
    pool, test = splits.stratified_split(y, test_fraction, splits.test_split_rng())
    info = {"root": None, "source": "sklearn.datasets.load_digits",
            "options": {"size": size, "val_fraction": float(val_fraction), "test_fraction": float(test_fraction),
                        "seed": int(seed), "fraction": float(fraction)},
            "split": f"test = fixed stratified {test_fraction} of all images (seed {splits.TEST_SEED}); "
                     "validation = stratified share of the rest (seed)"}
    return assemble("digits", (x[pool], y[pool]), (x[test], y[test]), [str(d) for d in range(10)],
                    scale=1.0 / 16.0, val_fraction=val_fraction, seed=seed, fraction=fraction,
                    size=None if size is None else int(size), info=info)


def _read_digits():
    """(images (1797, 8, 8) float64, target (1797,)): ``sklearn.datasets.load_digits()``'s arrays.

    Reads the CSV that scikit-learn ships (rows of 64 pixels and the label) without importing
    scikit-learn, whose import takes about a second: every run on digits would pay it.
    Falls back to ``load_digits`` if the file is not where scikit-learn keeps it.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return bunch.images, bunch.target
