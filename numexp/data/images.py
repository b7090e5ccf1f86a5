"""The one image pipeline: decode -> colour mode -> resize -> scale to [0, 1] -> normalise.

Loaders that read image files (gtsrb, image_folder) and :func:`transform_images` (prediction
on arbitrary files) both go through :func:`read_images` and :func:`normalize`, so a trained
model sees exactly the preprocessing it was trained with.

Note:
    Files are resized by Pillow in uint8 (bilinear), then scaled by 1/255. Data sets that
    arrive as arrays (digits, mnist, cifar10) are resized by :func:`resize_array`, which
    applies Pillow's own bilinear weights in float32, so nothing is rounded to uint8 there.
    Alpha channels are dropped (``RGBA -> RGB`` keeps the colour values).
"""
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
import warnings

import numpy as np
from PIL import Image

from numexp.data.base import DataError

IMAGE_EXTENSIONS = (".ppm", ".pgm", ".pbm", ".png", ".jpg", ".jpeg", ".bmp", ".gif")
_MODES = {1: "L", 3: "RGB"}
# What Pillow raises for a missing, truncated, non-image or oversized file
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# A constant channel would divide by zero; 1e-3 of the [0, 1] range keeps values finite
_MIN_STD = 1e-3
# Threads overlap file reads with Pillow's C decoding; more than 2 per core only adds GIL contention
_WORKERS = min(8, 2 * (os.cpu_count() or 1))


def transform_images(images, size, channels, mean, std):
    """Preprocess image files, PIL images or uint8 arrays exactly as training did.

    Args:
        images: a path, a PIL image, an (H, W) or (H, W, 3|4) uint8 array, or a list of
            them (an (N, H, W, 3|4) array is N images); any size and colour mode.
        size: side of the square output (``ds.in_shape[1]``); None keeps the native size
            (then all images must share it).
        channels: 1 (converted to ``L``) or 3 (converted to ``RGB``).
        mean, std: ``ds.mean``, ``ds.std``, shape (C,), in [0, 1] units.

    Shape:
        out: (N, C, size, size) float32, ``(pixel / 255 - mean) / std``.

    Raises:
        DataError: an image cannot be read (names the file).
    """
    if isinstance(images, (str, os.PathLike, Image.Image)) or _is_one_array_image(images):
        images = [images]
    x, _ = read_images(list(images), size, channels)
    return normalize(x, mean, std, scale=1.0 / 255.0)


def _is_one_array_image(images):
    return isinstance(images, np.ndarray) and (images.ndim == 2 or (images.ndim == 3 and images.shape[2] in (3, 4)))


def read_images(sources, size, channels, skip_bad=False, context=""):
    """Decode images in a thread pool into one uint8 array (the per-file loop is the decode itself).

    Args:
        sources: list of paths, PIL images or uint8 (H, W[, 3|4]) arrays.
        size: square output side; None keeps the native size, which must then be common.
        channels: 1 or 3.
        skip_bad: drop unreadable files with one warning instead of raising.
        context: appended to file names in messages, e.g. ``" (listed in GT-00001.csv)"``.

    Returns:
        x: (N_kept, C, H, W) uint8, and kept: (N_kept,) int64 indices into ``sources``.

    Raises:
        DataError: an unreadable file (unless ``skip_bad``), or differing native sizes.
    """
    if channels not in _MODES:
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    mode = _MODES[channels]
    shape = _output_shape(sources, size, channels, mode)
    x = np.empty((len(sources),) + shape, dtype=np.uint8)
    bad = []  # (index, reason); list.append is atomic, so workers share it safely

    def work(indices):
        for i in indices:
            try:
                img = _decode(sources[i], size, mode)
            except _BAD_IMAGE_ERRORS as err:
                bad.append((i, _reason(err)))
                continue
            if img.shape != shape:
                bad.append((i, f"native size {img.shape[2]}x{img.shape[1]} differs from "
                               f"{shape[2]}x{shape[1]}; pass size=N to resize"))
                continue
            x[i] = img

    chunks = np.array_split(np.arange(len(sources)), max(1, min(len(sources), 4 * _WORKERS)))
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        list(pool.map(work, chunks))
    return _drop_bad(x, sources, sorted(bad), skip_bad, context)


def _output_shape(sources, size, channels, mode):
    """(C, H, W) of every decoded image: from ``size``, or from the first readable image."""
    if size is not None:
        return (channels, int(size), int(size))
    for source in sources:
        try:
            return _decode(source, None, mode).shape
        except _BAD_IMAGE_ERRORS:
            continue  # reported with the others by the pool
    return (channels, 0, 0)


def _decode(source, size, mode):
    """One image -> (C, H, W) uint8 in ``mode``, resized (bilinear) to size x size."""
    if isinstance(source, np.ndarray):
        source = Image.fromarray(np.asarray(source, dtype=np.uint8))
    if isinstance(source, Image.Image):
        return _convert(source, size, mode)
    with Image.open(source) as im:
        _check_pixels(im)
        return _convert(im, size, mode)


def _check_pixels(im):
    """Refuse an image whose header claims more pixels than Pillow's limit before decoding it.

    Pillow itself raises only above twice ``Image.MAX_IMAGE_PIXELS`` (and just warns between),
    so a file claiming 100M pixels would still be decoded into gigabytes.
    """
    limit = Image.MAX_IMAGE_PIXELS
    width, height = im.size
    if limit and width * height > limit:
        raise Image.DecompressionBombError(f"image size {width}x{height} ({width * height} pixels) exceeds the "
                                           f"limit of {limit} pixels: a decompression bomb?")


def _convert(im, size, mode):
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")  # palette transparency converts cleanly only via RGBA
    if im.mode != mode:
        im = im.convert(mode)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _reason(err):
    if isinstance(err, FileNotFoundError):
        return "file does not exist"
    return f"{type(err).__name__}: {err}"


def _name(source, index):
    if isinstance(source, (Image.Image, np.ndarray)):
        return f"image #{index} ({type(source).__name__})"
    return str(source)


def _drop_bad(x, sources, bad, skip_bad, context):
    """Raise on the first bad file, or drop all bad rows with one warning."""
    if not bad:
        return x, np.arange(len(sources), dtype=np.int64)
    size_errors = [b for b in bad if b[1].startswith("native size")]
    if size_errors or not skip_bad:
        i, reason = (size_errors or bad)[0]
        more = f" ({len(bad) - 1} more bad image files)" if len(bad) > 1 else ""
        hint = "" if size_errors else "; pass skip_bad=True (data.skip_bad=true) to skip bad files"
        raise DataError(f"cannot read image file {_name(sources[i], i)}{context}: {reason}{more}{hint}")
    first = "; ".join(f"{_name(sources[i], i)}: {reason}" for i, reason in bad[:3])
    warnings.warn(f"skipped {len(bad)} of {len(sources)} bad image files{context} (first: {first})",
                  stacklevel=3)
    kept = np.setdiff1d(np.arange(len(sources)), [i for i, _ in bad]).astype(np.int64)
    return x[kept], kept


def resize_array(x, size):
    """Resize a batch of images with Pillow's bilinear weights, without rounding.

    The resize is separable and linear, so it is two matrix products with the matrices
    Pillow would apply (:func:`_resize_matrix`).

    Shape:
        x: (N, C, H, W) any dtype -> (N, C, size, size) float32 in the same units;
        x is returned unchanged when size is None or already H = W = size.
    """
    if size is None or x.shape[2:] == (size, size):
        return x
    rows = _resize_matrix(x.shape[2], int(size))
    cols = _resize_matrix(x.shape[3], int(size))
    return rows @ (x.astype(np.float32) @ cols.T)


@lru_cache(maxsize=None)
def _resize_matrix(n_in, n_out):
    """(n_out, n_in) float32 weights of Pillow's 1-D bilinear resize from n_in to n_out.

    Resizing the identity only along its height gives the weights column by column:
    Pillow skips the untouched horizontal pass, and mode ``F`` never rounds.
    """
    eye = Image.fromarray(np.eye(n_in, dtype=np.float32))
    return np.asarray(eye.resize((n_in, n_out), Image.BILINEAR), dtype=np.float32)


def channel_stats(x, scale):
    """Per-channel mean and std of ``x * scale`` (population std, float64 accumulation).

    uint8 images use a 256-bin histogram per channel: exact and without float copies.

    Shape:
        x: (N, C, H, W) -> mean, std: (C,) float32; std floored at 1e-3.
    """
    if len(x) == 0:
        raise DataError("the training split is empty: raise fraction or lower val_fraction")
    if x.dtype == np.uint8:
        values = np.arange(256) * float(scale)
        hist = np.stack([np.bincount(x[:, c].ravel(), minlength=256) for c in range(x.shape[1])])
        mean = hist @ values / hist.sum(axis=1)
        var = (hist * (values[None] - mean[:, None]) ** 2).sum(axis=1) / hist.sum(axis=1)
    else:
        mean, var = _float_stats(x, float(scale))
    return mean.astype(np.float32), np.maximum(np.sqrt(var), _MIN_STD).astype(np.float32)


def _float_stats(x, scale, chunk=2048):
    """Two-pass mean/var in float64, in sample chunks so no full float64 copy is made."""
    n = x.shape[0] * x.shape[2] * x.shape[3]
    total = sum(x[i:i + chunk].sum(axis=(0, 2, 3), dtype=np.float64) for i in range(0, len(x), chunk))
    mean = total * scale / n
    sq = sum(((x[i:i + chunk] * scale - mean[:, None, None]) ** 2).sum(axis=(0, 2, 3))
             for i in range(0, len(x), chunk))
    return mean, sq / n


def normalize(x, mean, std, scale):
    """``(x * scale - mean) / std`` per channel, as a new float32 array.

    Shape:
        x: (N, C, H, W) uint8 or float -> (N, C, H, W) float32; mean, std: (C,).
    """
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    out = x.astype(np.float32)
    out *= np.float32(scale) / std
    out -= mean / std
    return out


def list_images(folder):
    """Sorted image files directly in ``folder`` (by extension, case-insensitive; no recursion)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))
