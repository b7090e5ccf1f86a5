"""Data sets as normalised NumPy arrays, mini-batches and augmentation.

    ds = data.load("gtsrb", root="../shared/data", size=32, val_fraction=0.2, seed=0)
    ds.x_train  # (N, 3, 32, 32) float32, normalised with training-split mean/std
    for xb, yb in data.batches(ds.x_train, ds.y_train, 64, rng, augment=data.RandomCrop(4)):
        ...
    x = data.transform_images(["sign.png"], size=32, channels=3, mean=ds.mean, std=ds.std)

Every loader takes ``root`` (None reads ``$NUMEXP_DATA_ROOT``; digits needs none) and the
keyword options ``val_fraction`` (0 gives empty validation arrays), ``seed`` (validation
split and training subset), ``fraction`` (stratified share of train and test kept, for
quick runs) and, where it makes sense, ``size``. Test-side choices use a fixed seed, so
all runs of a seed sweep are scored on the same test images. Problems raise
:class:`DataError` with a complete message.
"""
import inspect

from numexp.data.base import ROOT_ENV, DataError
from numexp.data.batching import AUGMENTERS, Compose, RandomCrop, RandomHorizontalFlip, batches, make_augment
from numexp.data.cache import CACHE_ENV
from numexp.data.cifar10 import load_cifar10
from numexp.data.dataset import Dataset
from numexp.data.digits import load_digits
from numexp.data.gtsrb import load_gtsrb
from numexp.data.image_folder import load_image_folder
from numexp.data.images import IMAGE_EXTENSIONS, transform_images
from numexp.data.mnist import load_mnist

DATASETS = {
    "digits": load_digits,
    "gtsrb": load_gtsrb,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "image_folder": load_image_folder,
}

__all__ = ["AUGMENTERS", "CACHE_ENV", "Compose", "DATASETS", "DataError", "Dataset", "IMAGE_EXTENSIONS",
           "ROOT_ENV", "RandomCrop", "RandomHorizontalFlip", "batches", "load", "make_augment",
           "transform_images"]


def load(name, root=None, **options):
    """Load data set ``name`` (a key of :data:`DATASETS`) as a :class:`Dataset`.

    Args:
        name: "digits", "gtsrb", "mnist", "cifar10" or "image_folder".
        root: data root; None reads ``$NUMEXP_DATA_ROOT``.
        options: the loader's keyword options (see its docstring).

    Raises:
        DataError: unknown name or option, impossible option value, missing or bad data.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    loader = DATASETS[name]
    valid = [p for p in inspect.signature(loader).parameters if p != "root"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"unknown option {unknown[0]!r} for data set {name!r}; valid: {', '.join(valid)}")
    return loader(root, **options)
