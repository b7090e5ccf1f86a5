"""CIFAR-10 from the binary version (never the pickled python version)."""
import numpy as np

from numexp.data.base import DataError, check_common, find_subdir, read_class_names, resolve_root
from numexp.data.dataset import assemble

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
RECORD_BYTES = 1 + 3 * 32 * 32
HOW_TO_GET = ("Download the BINARY version of CIFAR-10 (cifar-10-binary.tar.gz, from the CIFAR-10 "
              "site) and unpack it into <root>, giving <root>/cifar-10-batches-bin/. The python "
              "version is not read: it is pickled and numexp never unpickles.")


def load_cifar10(root=None, *, size=None, val_fraction=0.1, seed=0, fraction=1.0):
    """CIFAR-10: 50,000 train + 10,000 test RGB 32x32 images of 10 classes, pixels / 255.

    Reads the binary version, ``root/cifar-10-batches-bin/`` (or ``root`` itself):
    ``data_batch_1..5.bin`` and ``test_batch.bin``, each a run of 3,073-byte records
    (1 label byte, then 1,024 red, 1,024 green, 1,024 blue bytes, row-major). The python
    version is pickled, and this project never unpickles.

    Args:
        size: resize with Pillow's bilinear weights in float32; None keeps 32x32.
        root, val_fraction, seed, fraction: as in :func:`numexp.data.load`.

    Shape:
        x_*: (N, 3, size, size) float32; class names from ``cifar10_names.txt``.
    """
    check_common(val_fraction, seed, fraction, size)
    folder = find_subdir(resolve_root(root, "cifar10", HOW_TO_GET), ["cifar-10-batches-bin", ""],
                         TEST_FILE, "CIFAR-10 (binary version)", HOW_TO_GET)
    missing = [str(folder / f) for f in TRAIN_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 files missing: {', '.join(missing)}. {HOW_TO_GET}")
    train = [read_batch(folder / f) for f in TRAIN_FILES]
    pool = (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]))
    info = {"root": str(folder), "split": "train = data_batch_1..5, test = test_batch; "
                                          "validation = stratified share of train (seed)",
            "options": {"size": size, "val_fraction": float(val_fraction), "seed": int(seed),
                        "fraction": float(fraction)}}
    return assemble("cifar10", pool, read_batch(folder / TEST_FILE), read_class_names("cifar10_names.txt"),
                    scale=1.0 / 255.0, val_fraction=val_fraction, seed=seed, fraction=fraction,
                    size=None if size is None else int(size), info=info)


def read_batch(path):
    """One binary batch file -> images (N, 3, 32, 32) uint8, labels (N,) int64.

    Raises:
        DataError: the length is not a whole number of records, or a label is not 0..9.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise DataError(f"CIFAR-10 file {path} has {raw.size} bytes, not a positive multiple of the "
                        f"{RECORD_BYTES}-byte record: truncated, or not the binary version. {HOW_TO_GET}")
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"CIFAR-10 file {path} holds label {labels.max()}, expected 0..9: is it CIFAR-100?")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels
