"""MNIST from the official IDX files, gzipped or not."""
import gzip
from pathlib import Path
import zlib

import numpy as np

from numexp.data.base import DataError, check_common, find_subdir, resolve_root
from numexp.data.dataset import assemble

HOW_TO_GET = ("Put the MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
              "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, from the MNIST database site "
              "or a mirror; gzipped or not) into <root>/MNIST/ or <root>.")
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
# With only one image/label pair present, the first 80% (file order) train, the last 20% test
SINGLE_PAIR_TRAIN_SHARE = 0.8


def load_mnist(root=None, *, size=None, val_fraction=0.1, seed=0, fraction=1.0):
    """MNIST: grey 28x28 digits 0..9, pixels scaled by 1/255.

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``root/MNIST/`` or
    ``root``. With both pairs: train = the 60,000 training images, test = the 10,000 t10k
    images. With only one pair (the shared data has only t10k), a FIXED split in file
    order: the first 80% (8,000 of t10k) are train+val, the last 20% (2,000) test;
    ``info["split"]`` says which. Validation is a stratified share of train (``seed``).

    Args:
        size: resize with Pillow's bilinear weights in float32; None keeps 28x28.
        root, val_fraction, seed, fraction: as in :func:`numexp.data.load`.

    Raises:
        DataError: no files, or a file with a wrong magic number, dimensions or length, or
            image and label counts that differ (names the file).
    """
    check_common(val_fraction, seed, fraction, size)
    folder = find_subdir(resolve_root(root, "mnist", HOW_TO_GET), ["MNIST", ""],
                         lambda d: any(_find(d, p, "images") for p in ("train", "t10k")), "MNIST", HOW_TO_GET)
    pairs = {prefix: _read_pair(folder, prefix) for prefix in ("train", "t10k") if _find(folder, prefix, "images")}
    if len(pairs) == 2:
        pool, test = pairs["train"], pairs["t10k"]
        split = "train = train-* files, test = t10k-* files"
    else:
        (prefix, (x, y)), = pairs.items()
        cut = int(round(SINGLE_PAIR_TRAIN_SHARE * len(y)))
        pool, test = (x[:cut], y[:cut]), (x[cut:], y[cut:])
        split = (f"only {prefix}-* files present: fixed split in file order, first {cut} = train+val, "
                 f"last {len(y) - cut} = test")
    info = {"root": str(folder), "split": split + "; validation = stratified share of train (seed)",
            "options": {"size": size, "val_fraction": float(val_fraction), "seed": int(seed),
                        "fraction": float(fraction)}}
    return assemble("mnist", pool, test, [str(d) for d in range(10)], scale=1.0 / 255.0,
                    val_fraction=val_fraction, seed=seed, fraction=fraction,
                    size=None if size is None else int(size), info=info)


def _find(folder, prefix, kind):
    """Path of ``<prefix>-<kind>-idxN-ubyte`` or its ``.gz``, or None."""
    stem = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_pair(folder, prefix):
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 of one prefix, counts checked."""
    images_path = _find(folder, prefix, "images")
    labels_path = _find(folder, prefix, "labels")
    if labels_path is None:
        raise DataError(f"{images_path} has no labels file: {folder / f'{prefix}-labels-idx1-ubyte'}[.gz] "
                        f"does not exist. {HOW_TO_GET}")
    images = read_idx(images_path, IMAGES_MAGIC, ndim=3)
    labels = read_idx(labels_path, LABELS_MAGIC, ndim=1)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path} holds label {labels.max()}, MNIST labels are 0..9")
    return images[:, None], labels.astype(np.int64)


def read_idx(path, magic, ndim):
    """One IDX file of unsigned bytes -> array of its declared dims.

    Format: big-endian int32 magic (0x0000080N, N = ndim), N big-endian int32 dims, then
    exactly prod(dims) bytes.

    Raises:
        DataError: unreadable gzip, wrong magic, short header, or payload length mismatch.
    """
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from None
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"IDX file {path} has magic number {found}, expected {magic} "
                        f"({'images' if magic == IMAGES_MAGIC else 'labels'}); is it the right file?")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    payload = len(raw) - header
    if payload != int(np.prod(dims)):
        raise DataError(f"IDX file {path} declares dims {dims} = {int(np.prod(dims))} bytes of data "
                        f"but holds {payload}: truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
