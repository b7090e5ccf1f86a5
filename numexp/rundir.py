"""Writing a run folder: ``metrics.csv``, ``summary.json``, ``checkpoint.npz``.

Every file is written to a temporary name in the same folder and renamed over the target
(``os.replace`` is atomic on one file system), so a run killed at any moment leaves the old
or the new file, never a torn one. Values pass through :func:`to_builtin` first: numpy
scalars become Python numbers (no ``np.float64(...)`` in JSON or CSV) and NaN becomes null.
"""
import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from numexp import nn

METRICS = "metrics.csv"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.npz"
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc", "seconds"]


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
    path = Path(path)
    # per-process name: parallel writers never share a temp file; open() keeps the umask's mode
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


class RunDir:
    """The files of one run inside ``path`` (Hydra's output dir); writes never leave it."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics = []

    def add_metrics(self, row):
        """Append one epoch's row and rewrite ``metrics.csv`` (small: rewriting keeps it atomic)."""
        self.metrics.append(row)
        atomic_write_text(self.path / METRICS, csv_text(self.metrics, METRIC_COLUMNS))

    def write_summary(self, summary):
        write_json(self.path / SUMMARY, summary)

    def save_checkpoint(self, state):
        nn.save_npz(self.path / CHECKPOINT, state)
