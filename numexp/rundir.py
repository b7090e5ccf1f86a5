"""Writing a run folder: ``metrics.csv``, ``summary.json``, ``checkpoint.npz``, ``confusion.csv``,
the progress file ``status.json`` (read by ``numexp status``), ``git.diff`` (uncommitted changes
of numexp's source tree, if any) and the resume state ``last.npz``; the rules for reusing a
folder (``resume=true``).

Every file is written to a temporary name in the same folder and renamed over the target
(``os.replace`` is atomic on one file system), so a run killed at any moment leaves the old
or the new file, never a torn one. Values pass through :func:`to_builtin` first: numpy
scalars become Python numbers (no ``np.float64(...)`` in JSON or CSV) and NaN becomes null.
"""
import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from numexp import nn
from numexp.atomic import atomic_open, is_temp_name

METRICS = "metrics.csv"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.npz"
CONFUSION = "confusion.csv"
# state, epoch, best val_acc, seconds per epoch, host and pid: rewritten after every epoch
STATUS = "status.json"
GIT_DIFF = "git.diff"
# the resume state, rewritten after every epoch, removed when the run completes
LAST = "last.npz"
# what a run itself writes (Hydra adds .hydra/ and the log)
RUN_FILES = (METRICS, SUMMARY, CHECKPOINT, CONFUSION, LAST, STATUS, GIT_DIFF)
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc", "seconds"]
STATE_FORMAT = 1


class RunDirError(ValueError):
    """An output folder that cannot be used as asked (not empty without resume, another run's folder)."""


def to_builtin(value):
    """``value`` with numpy types, tuples and paths turned into JSON-ready Python values; NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_builtin(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_json(path, obj):
    atomic_write_text(path, json.dumps(to_builtin(obj), indent=2, allow_nan=False) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def csv_text(rows, columns):
    """CSV of dict rows; floats keep full precision (``repr``) so equal runs give equal files."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in to_builtin(row).items()})
    return out.getvalue()


def confusion_text(matrix):
    """``confusion.csv``: header ``true/predicted,0,...,K-1``, one row of integer counts per true class."""
    k = len(matrix)
    lines = ["true/predicted," + ",".join(map(str, range(k)))]
    lines += [f"{t}," + ",".join(str(int(c)) for c in matrix[t]) for t in range(k)]
    return "\n".join(lines) + "\n"


def is_temp_file(name):
    """Names of the temporary files of :func:`atomic_write_text` and :func:`numexp.nn.save_npz`."""
    return is_temp_name(name)


class RunDir:
    """The files of one run inside ``path`` (Hydra's output dir); writes never leave it."""

    def __init__(self, path, create=True):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        self.metrics = []

    def run_files(self):
        """The run files already in the folder (not Hydra's ``.hydra/`` and log)."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def read_summary(self):
        """The folder's ``summary.json``, or None if there is none (or it cannot be read)."""
        try:
            return read_json(self.path / SUMMARY)
        except (OSError, ValueError):
            return None

    def add_metrics(self, row):
        """Append one epoch's row and rewrite ``metrics.csv`` (small: rewriting keeps it atomic)."""
        self.metrics.append(row)
        self.write_metrics()

    def write_metrics(self):
        atomic_write_text(self.path / METRICS, csv_text(self.metrics, METRIC_COLUMNS))

    def write_summary(self, summary):
        write_json(self.path / SUMMARY, summary)

    def write_text(self, name, text):
        atomic_write_text(self.path / name, text)

    def write_status(self, status):
        write_json(self.path / STATUS, status)

    def save_checkpoint(self, state):
        nn.save_npz(self.path / CHECKPOINT, state)

    def save_confusion(self, matrix):
        atomic_write_text(self.path / CONFUSION, confusion_text(matrix))

    def save_state(self, arrays, meta):
        """Write the resume state: ``arrays`` (name -> ndarray) and ``meta`` (JSON-ready) in ``last.npz``."""
        text = json.dumps(to_builtin({"format": STATE_FORMAT, **meta}), allow_nan=False)
        nn.save_npz(self.path / LAST, {**arrays, "meta": np.array(text)})

    def load_state(self):
        """``(arrays, meta)`` from ``last.npz``, or None if there is none; never unpickles.

        Raises:
            numexp.nn.CheckpointError: the file is not a valid resume state (names it and why).
        """
        path = self.path / LAST
        if not path.exists():
            return None
        arrays = nn.load_npz(path)
        try:
            meta = json.loads(str(arrays.pop("meta")))
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {STATE_FORMAT}")
        except (KeyError, ValueError, AttributeError) as e:
            raise nn.CheckpointError(f"resume state {path} is not usable ({type(e).__name__}: {e}); "
                                     f"delete it to restart the run from scratch") from None
        return arrays, meta

    def remove_state(self):
        (self.path / LAST).unlink(missing_ok=True)

    def remove_temp_files(self):
        """Delete temporary files left by a writer that was killed before its rename."""
        for p in self.path.iterdir():
            if p.is_file() and is_temp_file(p.name):
                p.unlink(missing_ok=True)


def check_run_folder(path, resume, config_hash, identity=None):
    """Before Hydra writes into ``path``: may a run with ``config_hash`` use this folder?

    A missing or empty folder is always fine. A non-empty one needs ``resume=true`` and must
    hold a run of the same config (its summary.json or last.npz names the config hash).

    Raises:
        RunDirError: the message says what is in the way and what to do.
    """
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not resume:
        raise RunDirError(f"run folder {path} is not empty: add resume=true to continue the run in it, "
                          f"or choose another folder (hydra.run.dir=...)")
    check_same_run(path, config_hash, identity)


def check_same_run(path, config_hash, identity=None):
    """Raise :class:`RunDirError` unless ``path`` holds a run with ``config_hash`` (or a run that
    recorded nothing yet: killed in its first epoch). With ``identity`` (the resolved config,
    :func:`numexp.config.identity`) the message names the first key that differs from the
    folder's ``.hydra/config.yaml``."""
    run = RunDir(path, create=False)
    if not run.path.is_dir() or not any(run.path.iterdir()):
        return
    if not (run.path / ".hydra").is_dir() and not run.run_files():
        raise RunDirError(f"folder {run.path} is not empty and holds no numexp run: choose another folder")
    recorded = {}
    summary = run.read_summary()
    if summary is not None:
        recorded["summary.json"] = summary.get("config_hash")
    if (run.path / LAST).exists():
        meta = state_meta(run.path / LAST)
        if meta is not None:  # an unreadable state is reported by the run, which cannot use it either
            recorded[LAST] = meta.get("config_hash")
    for name, found in recorded.items():
        if found != config_hash:
            raise RunDirError(f"run folder {run.path} holds a run of another config ({name} has config hash "
                              f"{found}, this run is {config_hash}{_config_difference(run.path, identity)}): "
                              f"resume=true continues only the same config; choose another folder")


def _config_difference(path, identity):
    """``"; lr: 0.003 -> 0.01"`` between the folder's recorded config and ``identity``, or ``""``."""
    saved = path / ".hydra" / "config.yaml"
    if identity is None or not saved.is_file():
        return ""
    from omegaconf import OmegaConf  # only for this message

    from numexp.config import NOT_IDENTITY

    try:
        old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    except Exception:  # noqa: BLE001 - the message just gets shorter
        return ""
    for key in NOT_IDENTITY:
        old.pop(key, None)
    found = first_difference(old, identity)
    return f"; {found}" if found else ""


def first_difference(old, new, prefix=""):
    """``"key: old -> new"`` for the first differing entry of two nested dicts (sorted keys), or ``""``."""
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a} -> {b}"
    return ""


def state_meta(path):
    """The ``meta`` dict of a ``last.npz`` without reading its arrays; None if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(str(npz["meta"]))
    except Exception:  # noqa: BLE001 - any unreadable file: the caller decides what that means
        return None
