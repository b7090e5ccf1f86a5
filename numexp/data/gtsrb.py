"""GTSRB, the German Traffic Sign Recognition Benchmark, from its official folder layout."""
import csv
import hashlib
import logging
from pathlib import Path
import warnings

import numpy as np

from numexp.data import cache
from numexp.data.base import DataError, check_common, find_subdir, read_class_names, resolve_root
from numexp.data.dataset import assemble
from numexp.data.images import read_images

log = logging.getLogger(__name__)

NUM_CLASSES = 43
HOW_TO_GET = ("Point the root at the folder holding GTSRB/ (or at GTSRB/ itself). Get the data from "
              "the official GTSRB site (https://benchmark.ini.rub.de/gtsrb_dataset.html): "
              "GTSRB_Final_Training_Images.zip gives GTSRB/Final_Training/Images/000NN/, "
              "GTSRB_Final_Test_Images.zip gives GTSRB/Final_Test/Images/, and GT-final_test.csv "
              "(from GTSRB_Final_Test_GT.zip) goes into GTSRB/Final_Test/Images/.")
_TRAIN_DIR = Path("Final_Training", "Images")
_TEST_CSV = Path("Final_Test", "Images", "GT-final_test.csv")


def load_gtsrb(root=None, *, size=32, val_fraction=0.2, seed=0, fraction=1.0, skip_bad=False,
               cache_dir=None, use_cache=True):
    """GTSRB: 43 classes of traffic signs, RGB, resized to ``size`` x ``size``.

    Expects ``root/GTSRB/`` (or ``root`` = the GTSRB folder) with the official layout:
    ``Final_Training/Images/000NN/GT-000NN.csv`` and ``Final_Test/Images/GT-final_test.csv``
    (``;``-separated, columns Filename ... ClassId), each listing its ``.ppm`` images.

    Validation is split off the training set by whole tracks: files are named
    ``TTTTT_FFFFF.ppm`` (track, frame) and all frames of a track show one physical sign, so
    the group key (ClassId, track) never spans train and val (a file not named so is its own
    group). Tracks are split per class with seed ``seed``.

    The first load decodes every image (Pillow, RGB, bilinear resize, uint8) and caches
    them in ``<cache_dir>/gtsrb-<hash>.npz``, keyed by the resolved root, ``size`` and
    ``skip_bad``; a CSV file that changed (size or mtime) or any damage to the cache file
    makes it rebuild with a warning. Editing images without touching the CSVs needs
    ``use_cache=False`` or deleting the cache file.

    Args:
        root: data root; None reads ``$NUMEXP_DATA_ROOT``.
        size: output side in pixels; None keeps the native size (must be common).
        val_fraction: share of each class's tracks held out for validation.
        seed: seed of the validation split and of the ``fraction`` subset of training data.
        fraction: stratified share of training and test images kept, for quick runs.
        skip_bad: skip unreadable or missing image files with a warning instead of raising.
        cache_dir: cache folder; None reads ``$NUMEXP_CACHE_DIR``, else ``~/.cache/numexp``.
        use_cache: read and write the cache.

    Shape:
        x_*: (N, 3, size, size) float32; classes named as in ``gtsrb_names.txt``.
    """
    check_common(val_fraction, seed, fraction, size)
    size = None if size is None else int(size)
    base = find_subdir(resolve_root(root, "gtsrb", HOW_TO_GET), ["GTSRB", ""], _TRAIN_DIR,
                       "GTSRB", HOW_TO_GET)
    arrays, cache_file, hit = _load_arrays(base, size, skip_bad, cache_dir, use_cache)
    groups = np.stack([arrays["y_train"], arrays["track_train"]], axis=1)
    info = {"root": str(base), "cache": None if cache_file is None else str(cache_file), "cache_hit": hit,
            "n_skipped": int(len(arrays["skipped"])),
            "options": {"size": size, "val_fraction": float(val_fraction), "seed": int(seed),
                        "fraction": float(fraction), "skip_bad": bool(skip_bad)},
            "split": "validation = whole (ClassId, track) groups of Final_Training, per class; "
                     "test = Final_Test"}
    return assemble("gtsrb", (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"]),
                    read_class_names("gtsrb_names.txt"), scale=1.0 / 255.0, val_fraction=val_fraction,
                    seed=seed, fraction=fraction, groups=groups, info=info)


def _load_arrays(base, size, skip_bad, cache_dir, use_cache):
    """Decoded uint8 arrays from the cache, or parsed from the files (then cached).

    Returns:
        arrays: x_train (N, 3, H, W) uint8, y_train, track_train (N,) int64, x_test, y_test,
        skipped (K,) str; the cache path (None if caching is off); whether it was a hit.
    """
    train_csvs = _training_csvs(base)
    test_csv = base / _TEST_CSV
    if not test_csv.is_file():
        raise DataError(f"GTSRB test labels not found: {test_csv} does not exist. {HOW_TO_GET}")
    if not use_cache:
        return _parse(base, train_csvs, test_csv, size, skip_bad), None, False
    key = cache.cache_meta("gtsrb", root=str(base), size=size, skip_bad=bool(skip_bad))
    meta = cache.cache_meta("gtsrb", root=str(base), size=size, skip_bad=bool(skip_bad),
                            fingerprint=_fingerprint(train_csvs + [test_csv]))
    path = cache.cache_path(cache.cache_dir(cache_dir), "gtsrb", key)
    arrays = cache.load_cache(path, meta, lambda a: _validate(a, size))
    if arrays is not None:
        _warn_skipped(arrays["skipped"])
        return arrays, path, True
    arrays = _parse(base, train_csvs, test_csv, size, skip_bad)
    cache.save_cache(path, meta, arrays)
    return arrays, path, False


def _training_csvs(base):
    """``Final_Training/Images/000NN/GT-000NN.csv`` for every class folder, sorted."""
    folders = sorted(p for p in (base / _TRAIN_DIR).iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise DataError(f"no class folders (00000, 00001, ...) in {base / _TRAIN_DIR}. {HOW_TO_GET}")
    csvs = [folder / f"GT-{folder.name}.csv" for folder in folders]
    missing = [str(c) for c in csvs if not c.is_file()]
    if missing:
        raise DataError(f"GTSRB annotation file {missing[0]} does not exist "
                        f"({len(missing)} class folders lack theirs). {HOW_TO_GET}")
    return csvs


def _fingerprint(files):
    """Hash of each file's path, size and mtime: detects replaced or edited annotation files."""
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()


def _parse(base, train_csvs, test_csv, size, skip_bad):
    """Read every CSV and decode every image they list (thread pool)."""
    rows = [_read_csv(c) for c in train_csvs]
    paths = [p for r in rows for p in r[0]]
    y_train = np.concatenate([r[1] for r in rows])
    track = np.array([_track(p.name, i) for i, p in enumerate(paths)], dtype=np.int64)
    test_paths, y_test = _read_csv(test_csv)
    log.info("decoding %d GTSRB images from %s (cached afterwards)", len(paths) + len(test_paths), base)
    x_train, kept = read_images(paths, size, 3, skip_bad, context=" (listed in a GTSRB training CSV)")
    skipped = [str(paths[i]) for i in np.setdiff1d(np.arange(len(paths)), kept)]
    x_test, kept_test = read_images(test_paths, size, 3, skip_bad, context=f" (listed in {test_csv})")
    skipped += [str(test_paths[i]) for i in np.setdiff1d(np.arange(len(test_paths)), kept_test)]
    return {"x_train": x_train, "y_train": y_train[kept], "track_train": track[kept],
            "x_test": x_test, "y_test": y_test[kept_test], "skipped": np.array(skipped, dtype=str)}


def _read_csv(path):
    """(image paths, ClassId (N,) int64) of one ``;``-separated GTSRB annotation file."""
    with open(path, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f, delimiter=";"))
    header = [h.strip() for h in lines[0]] if lines else []
    if "Filename" not in header or "ClassId" not in header:
        raise DataError(f"{path} lacks the Filename or ClassId column (header: {';'.join(header)}); "
                        f"the test set needs GT-final_test.csv with labels. {HOW_TO_GET}")
    name_col, class_col = header.index("Filename"), header.index("ClassId")
    paths, labels = [], []
    for number, row in enumerate(lines[1:], start=2):
        if not row:
            continue
        try:
            label = int(row[class_col])
            paths.append(path.parent / row[name_col].strip())
        except (IndexError, ValueError):
            raise DataError(f"{path} line {number}: cannot read Filename/ClassId from {';'.join(row)!r}") from None
        if not 0 <= label < NUM_CLASSES:
            raise DataError(f"{path} line {number}: ClassId {label} is outside 0..{NUM_CLASSES - 1}")
        labels.append(label)
    return paths, np.array(labels, dtype=np.int64)


def _track(filename, index):
    """Track number of ``TTTTT_FFFFF.ppm``; other names get a unique negative id (own group)."""
    head = filename.split("_", 1)[0]
    return int(head) if "_" in filename and head.isdigit() else -1 - index


def _validate(arrays, size):
    """Raise ValueError unless the cache arrays have the keys, dtypes and shapes of a GTSRB cache."""
    expected = {"x_train", "y_train", "track_train", "x_test", "y_test", "skipped"}
    if set(arrays) != expected:
        raise ValueError(f"keys {sorted(arrays)} != {sorted(expected)}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3 or y.dtype != np.int64 or y.shape != x.shape[:1]:
            raise ValueError(f"bad {split} arrays: x {x.dtype} {x.shape}, y {y.dtype} {y.shape}")
        if size is not None and x.shape[2:] != (size, size):
            raise ValueError(f"{split} images are {x.shape[2:]}, expected {(size, size)}")
        if len(y) and not (y.min() >= 0 and y.max() < NUM_CLASSES):
            raise ValueError(f"{split} labels outside 0..{NUM_CLASSES - 1}")
    if arrays["track_train"].dtype != np.int64 or arrays["track_train"].shape != arrays["y_train"].shape:
        raise ValueError("track ids do not match the training labels")


def _warn_skipped(skipped):
    if len(skipped):
        warnings.warn(f"GTSRB cache was built with skip_bad=True and skips {len(skipped)} bad image files "
                      f"(first: {', '.join(map(str, skipped[:3]))})", stacklevel=4)
