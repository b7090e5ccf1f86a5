"""The error type, data-root lookup and option checks shared by every loader."""
import os
from importlib import resources
from pathlib import Path

ROOT_ENV = "NUMEXP_DATA_ROOT"
ROOT_HINT = (f"set the data root with the environment variable {ROOT_ENV}=/path/to/data "
             "or the config key data.root=/path/to/data")


class DataError(Exception):
    """A data set is missing, malformed or asked for with impossible options.

    The message is complete on its own (absolute paths, how to fix it), so the harness
    prints it and exits without a traceback.
    """


def resolve_root(root, dataset, how_to_get):
    """Absolute data root: ``root`` if given, else ``$NUMEXP_DATA_ROOT``.

    Raises:
        DataError: neither is set, or the folder does not exist.
    """
    if root is None or str(root) == "":
        root = os.environ.get(ROOT_ENV) or None
    if root is None:
        raise DataError(f"no data root for {dataset!r}: {ROOT_HINT}. {how_to_get}")
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data root {path} for {dataset!r} does not exist or is not a folder: "
                        f"{ROOT_HINT}. {how_to_get}")
    return path


def find_subdir(root, names, marker, dataset, how_to_get):
    """First of ``root/name`` (``""`` = root itself) that contains ``marker``.

    ``marker`` is a relative path, or a callable ``folder -> bool``. The error lists every
    place looked, so a wrong root is obvious.
    """
    candidates = [(root / name) if name else root for name in names]
    for folder in candidates:
        found = marker(folder) if callable(marker) else (folder / marker).exists()
        if found:
            return folder
    looked = ", ".join(str(c / marker) if not callable(marker) else str(c) for c in candidates)
    raise DataError(f"{dataset} data not found: looked in {looked}; {ROOT_HINT}. {how_to_get}")


def read_class_names(filename):
    """Class names shipped in ``numexp/data/<filename>``, one per line, index = label."""
    text = resources.files("numexp.data").joinpath(filename).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_common(val_fraction, seed, fraction, size=None, test_fraction=None, channels=None):
    """Raise DataError naming the first impossible option value (config values arrive untyped)."""
    _check(val_fraction, "val_fraction", "in [0, 1)", lambda v: 0.0 <= float(v) < 1.0)
    _check(fraction, "fraction", "in (0, 1]", lambda v: 0.0 < float(v) <= 1.0)
    _check(seed, "seed", "an integer", _is_int)
    if size is not None:
        _check(size, "size", "a positive integer or None", lambda v: _is_int(v) and v >= 1)
    if test_fraction is not None:
        _check(test_fraction, "test_fraction", "in (0, 1)", lambda v: 0.0 < float(v) < 1.0)
    if channels is not None:
        _check(channels, "channels", "1 or 3", lambda v: v in (1, 3))


def _is_int(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and int(value) == value


def _check(value, name, rule, ok):
    try:
        valid = ok(value)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise DataError(f"{name} must be {rule}, got {value!r}")
