"""Any folder of images with one sub-folder per class."""
from pathlib import Path

import numpy as np

from numexp.data import splits
from numexp.data.base import DataError, check_common, resolve_root
from numexp.data.dataset import assemble
from numexp.data.images import IMAGE_EXTENSIONS, list_images, read_images

HOW_TO_GET = ("Lay the images out as <root>/<class_name>/*.png (or .ppm .jpg .jpeg .bmp .gif), "
              "optionally under <root>/train/ and <root>/test/.")


def load_image_folder(root=None, *, size=32, channels=3, val_fraction=0.1, test_fraction=0.2, seed=0,
                      fraction=1.0, skip_bad=False):
    """Images in ``root/<class_name>/``; labels follow the sorted class folder names.

    If ``root`` has both ``train/`` and ``test/`` sub-folders, they are the train and test
    sets (test classes must be a subset of train classes). Otherwise a stratified
    ``test_fraction`` of the images is the test set, chosen with the fixed seed
    ``splits.TEST_SEED``. Files are found by extension (``IMAGE_EXTENSIONS``, one level,
    hidden files ignored) and converted to RGB or L; ``fraction`` is applied before decoding.

    Args:
        size: output side (Pillow bilinear); None keeps the native size (must be common).
        channels: 3 (RGB) or 1 (L).
        skip_bad: skip unreadable image files with a warning instead of raising.
        root, val_fraction, test_fraction, seed, fraction: as in :func:`numexp.data.load`.

    Raises:
        DataError: no class folders, an empty class folder, or an unreadable file (names it).
    """
    check_common(val_fraction, seed, fraction, size, test_fraction=test_fraction, channels=channels)
    size = None if size is None else int(size)
    root = resolve_root(root, "image_folder", HOW_TO_GET)
    if (root / "train").is_dir() and (root / "test").is_dir():
        class_names, train_files, train_y = _scan(root / "train")
        test_names, test_files, test_y = _scan(root / "test")
        unknown = sorted(set(test_names) - set(class_names))
        if unknown:
            raise DataError(f"test classes {unknown} in {root / 'test'} have no folder in {root / 'train'}")
        test_y = np.searchsorted(class_names, np.asarray(test_names))[test_y]
        split = "train = train/, test = test/"
    else:
        class_names, files, y = _scan(root)
        pool, test = splits.stratified_split(y, test_fraction, splits.test_split_rng())
        train_files, train_y = [files[i] for i in pool], y[pool]
        test_files, test_y = [files[i] for i in test], y[test]
        split = f"test = fixed stratified {test_fraction} of all images (seed {splits.TEST_SEED})"
    # Subset before decoding: quick runs should not pay for images they drop
    keep = splits.stratified_subset(train_y, fraction, splits.subset_rng(seed))
    keep_test = splits.stratified_subset(test_y, fraction, splits.test_subset_rng())
    x_train, kept = read_images([train_files[i] for i in keep], size, channels, skip_bad)
    x_test, kept_test = read_images([test_files[i] for i in keep_test], size, channels, skip_bad)
    info = {"root": str(root), "split": split + "; validation = stratified share of train (seed)",
            "options": {"size": size, "channels": int(channels), "val_fraction": float(val_fraction),
                        "test_fraction": float(test_fraction), "seed": int(seed), "fraction": float(fraction),
                        "skip_bad": bool(skip_bad)},
            "n_skipped": int(len(keep) - len(kept) + len(keep_test) - len(kept_test))}
    return assemble("image_folder", (x_train, train_y[keep][kept]), (x_test, test_y[keep_test][kept_test]),
                    class_names, scale=1.0 / 255.0, val_fraction=val_fraction, seed=seed, info=info)


def _scan(folder):
    """Sorted class names, image paths and labels (N,) int64 of ``folder/<class>/``."""
    classes = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {folder}. {HOW_TO_GET}")
    files, labels = [], []
    for label, class_dir in enumerate(classes):
        images = list_images(class_dir)
        if not images:
            raise DataError(f"class folder {class_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        files += images
        labels += [label] * len(images)
    return [c.name for c in classes], files, np.array(labels, dtype=np.int64)
