"""Checked ``.npz`` caches of decoded images, written atomically.

A cache file stores plain arrays (no pickles) plus ``meta``, a JSON string of everything
it was built from (format version, resolved root, options, a fingerprint of the source
files). A load whose ``meta`` differs, or that fails in any way, is reported with a warning
and rebuilt: a cache is never trusted. Writers save to a temporary file in the cache folder
and ``os.replace`` it, so readers and concurrent builders only ever see complete files.
"""
import contextlib
import hashlib
import json
import os
from pathlib import Path
import warnings

import numpy as np

from numexp.atomic import atomic_open

CACHE_ENV = "NUMEXP_CACHE_DIR"
FORMAT_VERSION = 1


def cache_dir(option=None):
    """The cache folder: ``option``, else ``$NUMEXP_CACHE_DIR``, else ``~/.cache/numexp``."""
    folder = option or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "numexp"
    return Path(folder).expanduser().resolve()


def cache_meta(dataset, **parts):
    """The JSON ``meta`` string a cache is keyed and validated by (sorted keys: stable)."""
    return json.dumps({"dataset": dataset, "version": FORMAT_VERSION, **parts}, sort_keys=True)


def cache_path(folder, dataset, meta_key):
    """``<folder>/<dataset>-<hash>.npz``; the hash covers the meta parts that name the cache."""
    digest = hashlib.sha256(meta_key.encode()).hexdigest()[:16]
    return Path(folder) / f"{dataset}-{digest}.npz"


def load_cache(path, meta, validate):
    """Arrays of a valid cache file, or None (with a warning if the file exists but is unusable).

    Args:
        meta: the expected ``meta`` string.
        validate: callable(arrays) raising ValueError if shapes/dtypes/values are wrong.
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        if str(arrays.pop("meta", "")) != meta:
            raise ValueError("it was built by another numexp version or from other data/options")
        validate(arrays)
        return arrays
    # Any failure (bad zip, truncated member, wrong keys) means rebuild, never crash
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"ignoring unusable cache {path} ({type(err).__name__}: {err}); rebuilding it",
                      stacklevel=3)
        return None


# set by no_writes(): caches are read but not written
_writes_off = False


@contextlib.contextmanager
def no_writes():
    """Within it, loaders read their caches but never write one (``numexp plan`` writes nothing)."""
    global _writes_off
    before, _writes_off = _writes_off, True
    try:
        yield
    finally:
        _writes_off = before


def save_cache(path, meta, arrays):
    """Write ``arrays`` + ``meta`` to ``path`` atomically; warn (don't fail) if it cannot be written.
    Returns whether it was written (never inside :func:`no_writes`)."""
    if _writes_off:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            np.savez(f, meta=np.array(meta), **arrays)
        return True
    except OSError as err:
        warnings.warn(f"could not write cache {path} ({err}); continuing without it", stacklevel=3)
        return False
