"""Predict the classes of image files with a trained run.

    numexp predict RUN sign.png photos/ [--top-k 3] [--out predictions.csv]
    python -m numexp.predict RUN sign.png photos/

RUN is a run folder (``.hydra/config.yaml``, ``summary.json``, ``checkpoint.npz``) or a
checkpoint file inside one. The model is rebuilt from the run's composed config, its
parameters are loaded from the checkpoint, and every image goes through the run's own
preprocessing: converted to the run's colour mode, resized to its input size and normalised
with the mean and std of its training split, which ``summary.json`` records (``data.mean``,
``data.std``), so the training data is never needed.

A PATH is an image file of any format Pillow reads (ppm, png, jpg, ...; any size or mode) or
a folder, searched recursively for files with an image extension. Files that cannot be read
as images are named on stderr, skipped and counted; the exit code is 1 when no image could be
predicted, 2 for a usage error, else 0.

Scores are softmax probabilities for a run trained with the softmax loss. For an SVM head
(``loss=svm_l1`` or ``svm_l2``) they are the raw class scores, margins that are not
probabilities and do not sum to one.
"""
import argparse
import csv
import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from numexp import nn
from numexp.data.base import DataError, read_class_names
from numexp.data.images import IMAGE_EXTENSIONS, normalize, read_images
from numexp.rundir import CHECKPOINT, SUMMARY, atomic_write_text, read_json

# the head's loss -> what its scores are
SCORE_KINDS = {"softmax": "probability", "svm_l1": "margin", "svm_l2": "margin"}
# class names shipped with the package, for runs whose summary.json does not list them
NAME_FILES = {"gtsrb": "gtsrb_names.txt", "cifar10": "cifar10_names.txt", "digits": "digits_names.txt",
              "mnist": "digits_names.txt"}


class RunError(Exception):
    """A run folder or checkpoint that cannot be used; the message says which file and why."""


@dataclass
class Run:
    """A trained model ready to score images, with what it needs to preprocess them.

    Attributes:
        path: the run folder; checkpoint: the parameter file loaded.
        cfg: the run's composed config (OmegaConf); summary: its ``summary.json`` as a dict.
        model: the rebuilt network with the checkpoint loaded, in eval mode.
        in_shape: (C, H, W) of one input; class_names: one name per label.
        mean, std: (C,) float32 normalisation of the training split; None when the run did
            not record them (prediction on files then refuses, evaluation uses the data's).
    """
    path: Path
    checkpoint: Path
    cfg: object
    summary: dict
    model: object
    in_shape: tuple
    class_names: list
    mean: np.ndarray = None
    std: np.ndarray = None

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def loss(self):
        return str(self.cfg.loss.name)

    @property
    def score_kind(self):
        """``"probability"`` (softmax head), ``"margin"`` (SVM head) or ``"score"``."""
        return SCORE_KINDS.get(self.loss, "score")

    @property
    def batch_size(self):
        return int(self.cfg.get("eval_batch_size", 1000))

    @property
    def threads(self):
        return int(self.cfg.get("threads", 1))

    def describe(self):
        """One line: model, data, classes and the recorded test accuracy."""
        acc = self.summary.get("test_acc")
        acc = f", test_acc {100 * acc:.2f}%" if isinstance(acc, (int, float)) else ""
        return (f"{self.cfg.model.name} trained on {self.cfg.data.name} (input {self.in_shape}, "
                f"{self.num_classes} classes, loss {self.loss}{acc}), checkpoint {self.checkpoint}")

    def score_text(self):
        """What the printed numbers are."""
        if self.score_kind == "probability":
            return "scores are softmax probabilities"
        if self.score_kind == "margin":
            return (f"scores are SVM margins (raw class scores of the {self.loss} head), not probabilities: "
                    f"they do not sum to 1, the largest wins")
        return f"scores are raw class scores of the {self.loss} head"

    def check_preprocessing(self):
        """Raise :class:`RunError` unless the run recorded the normalisation new images need."""
        if self.mean is None or self.std is None:
            raise RunError(f"{self.path / SUMMARY} does not record the normalisation of the training data "
                           f"(data.mean, data.std), so new images cannot be preprocessed as in training; "
                           f"retrain the run with this numexp version")

    def transform(self, x_uint8):
        """Normalise decoded images as the run's training split was.

        Shape:
            x_uint8: (N, C, H, W) uint8 -> (N, C, H, W) float32.
        """
        self.check_preprocessing()
        return normalize(x_uint8, self.mean, self.std, scale=1.0 / 255.0)

    def scores(self, x):
        """Raw class scores of the model, in batches of the run's ``eval_batch_size``.

        The BLAS thread count is the run's ``threads``: the same sums as the trainer's
        evaluation, so the same predictions.

        Shape:
            x: (N, C, H, W) float32 -> (N, K) float32.
        """
        return batch_scores(self.model, x, self.batch_size, self.threads)

    def outputs(self, scores):
        """Scores as reported: softmax probabilities for a softmax head, else unchanged."""
        return softmax(scores) if self.score_kind == "probability" else np.asarray(scores, dtype=np.float64)


def load_run(path):
    """Rebuild the model of a run folder (or of a checkpoint inside one) and load its parameters.

    Raises:
        RunError: a missing or unreadable config, summary or checkpoint, or a checkpoint whose
            arrays do not fit the config's model (the message names the key and both shapes).
    """
    from omegaconf import OmegaConf  # Hydra's config objects: only once a run is used

    path = Path(path)
    if path.is_file():
        run_dir, checkpoint = path.parent, path
    elif path.is_dir():
        run_dir, checkpoint = path, path / CHECKPOINT
    else:
        raise RunError(f"{path} does not exist: RUN is a run folder or a checkpoint file inside one")
    config_path = next((p for p in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml") if p.is_file()),
                       None)
    if config_path is None:
        raise RunError(f"{run_dir} has no .hydra/config.yaml: RUN must be a run folder written by numexp "
                       f"(or a checkpoint with its config beside it)")
    summary_path = run_dir / SUMMARY
    try:
        cfg = OmegaConf.load(config_path)
        summary = read_json(summary_path) if summary_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read the run's config or summary in {run_dir}: {e}") from None
    info = summary.get("data") or {}
    if not info.get("in_shape") or not (info.get("num_classes") or info.get("class_names")):
        raise RunError(f"{summary_path} does not record the run's input shape and classes (data.in_shape, "
                       f"data.num_classes): the run did not get as far as loading its data")
    in_shape = tuple(int(d) for d in info["in_shape"])
    num_classes = int(info.get("num_classes") or len(info["class_names"]))
    if not checkpoint.is_file():
        raise RunError(f"{run_dir} has no {checkpoint.name}: the run saved no parameters (did it finish an epoch?)")
    model = build_checkpoint_model(cfg, checkpoint, in_shape, num_classes)
    mean, std = info.get("mean"), info.get("std")
    if mean is not None and std is not None:
        mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    else:
        mean = std = None
    return Run(run_dir, checkpoint, cfg, summary, model, in_shape, class_names(summary, num_classes), mean, std)


def build_checkpoint_model(cfg, checkpoint, in_shape, num_classes):
    """The model of ``cfg`` for inputs ``in_shape`` with the parameters of ``checkpoint``, in eval mode.

    Raises:
        RunError: unreadable checkpoint, a model that cannot be built, or arrays that do not fit.
    """
    from numexp.config import ConfigError
    from numexp.trainer import build_model

    try:
        state = nn.load_npz(checkpoint)
        # the initial weights are overwritten by the checkpoint: any seed will do
        model = build_model(cfg, SimpleNamespace(in_shape=tuple(in_shape), num_classes=int(num_classes)),
                            np.random.default_rng(0))
    except (nn.CheckpointError, ConfigError) as e:
        raise RunError(str(e)) from None
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as e:
        message = e.args[0] if e.args else str(e)
        raise RunError(f"checkpoint {checkpoint} does not fit model={cfg.model.name} of the run's config "
                       f"(input {tuple(in_shape)}, {num_classes} classes): {message}") from None
    return model.eval()


def batch_scores(model, x, batch_size, threads=1):
    """``model(x)`` in eval mode, in batches, with ``threads`` BLAS threads.

    Shape:
        x: (N, C, H, W) -> (N, K) float32 (a (0, 0) array when N = 0).
    """
    from threadpoolctl import threadpool_limits

    model.eval()
    with threadpool_limits(limits=int(threads)):
        parts = [model(x[i:i + batch_size]) for i in range(0, len(x), int(batch_size))]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def softmax(scores):
    """Row-wise softmax in float64 (the max is subtracted first, so nothing overflows).

    Shape:
        scores: (N, K) -> (N, K) float64, rows summing to 1.
    """
    s = np.asarray(scores, dtype=np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def top_k(values, k):
    """Labels and values of the ``k`` largest entries per row, largest first (ties: lower label first).

    Shape:
        values: (N, K) -> labels: (N, min(k, K)) int64, top: (N, min(k, K)).
    """
    k = min(int(k), values.shape[1])
    labels = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return labels.astype(np.int64), np.take_along_axis(values, labels, axis=1)


def class_names(summary, k):
    """The run's class names: summary.json's ``data.class_names``, else the shipped list of its
    data set, else the label numbers."""
    info = (summary or {}).get("data") or {}
    names = info.get("class_names")
    if names and len(names) == k:
        return [str(n) for n in names]
    name_file = NAME_FILES.get(info.get("dataset"))
    if name_file:
        names = read_class_names(name_file)
        if len(names) == k:
            return names
    return [str(i) for i in range(k)]


def class_label(label, names):
    """'14 Stop' (the label alone when the name is the label, as for digits)."""
    name = str(names[label])
    return name if name == str(label) else f"{label} {name}"


# --------------------------------------------------------------------------- image files

def image_files(paths):
    """Expand folders (recursively, files with an image extension, sorted) and keep files as given.

    Returns:
        files: list of Path to try; problems: list of (path, reason) for paths that are not there
        or folders without images; ignored: number of non-image files skipped in folders.
    """
    files, problems, ignored = [], [], 0
    for path in map(Path, paths):
        if path.is_dir():
            found, others = [], 0
            for p in sorted(path.rglob("*")):
                if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
                    continue
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(p)
                else:
                    others += 1
            if not found:
                problems.append((path, f"folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"))
            files += found
            ignored += others
        elif path.is_file():
            files.append(path)
        else:
            problems.append((path, "does not exist"))
    return files, problems, ignored


def read_files(files, size, channels):
    """Decode image files into uint8 arrays, skipping the unreadable ones.

    Returns:
        x: (N_ok, C, size, size) uint8; kept: (N_ok,) indices into ``files``;
        bad: list of (path, reason).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every skipped file is reported below, with its reason
        x, kept = read_images(list(files), size, channels, skip_bad=True)
    missing = np.setdiff1d(np.arange(len(files)), kept)
    return x, kept, [(files[i], _why_unreadable(files[i])) for i in missing]


def _why_unreadable(path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                return f"image of {width}x{height} pixels exceeds Pillow's limit of {Image.MAX_IMAGE_PIXELS}"
            im.load()
    except Exception as e:  # Pillow raises many types for bad data; the reason is all we want
        if isinstance(e, FileNotFoundError):
            return "does not exist"
        return f"not readable as an image ({type(e).__name__}: {e})"
    return "not readable as an image"


@dataclass
class Prediction:
    """Top-k classes of one image file."""
    path: Path
    labels: np.ndarray
    scores: np.ndarray


def predict_files(run, files, k=3, chunk=None):
    """Top-k predictions of image files with the run's preprocessing.

    Files are decoded and scored in chunks of ``chunk`` (default: the run's
    ``eval_batch_size``), so a folder of any size fits in memory.

    Returns:
        predictions: list of :class:`Prediction`, in file order; bad: list of (path, reason).
    """
    channels, height, width = run.in_shape
    if height != width:
        raise RunError(f"the run's inputs are {height}x{width}; prediction on files needs square inputs")
    chunk = int(chunk or run.batch_size)
    predictions, bad = [], []
    for start in range(0, len(files), chunk):
        part = files[start:start + chunk]
        x, kept, part_bad = read_files(part, height, channels)
        bad += part_bad
        if not len(kept):
            continue
        labels, top = top_k(run.outputs(run.scores(run.transform(x))), k)
        predictions += [Prediction(part[i], labels[j], top[j]) for j, i in enumerate(kept)]
    return predictions, bad


def format_score(value, kind):
    return f"{value:.4f}" if kind == "probability" else f"{value:+.4f}"


def format_predictions(predictions, names, kind):
    """Text block per image: its path, then one line per class (rank, label, name, score)."""
    lines = []
    for p in predictions:
        lines.append(str(p.path))
        labels = [class_label(int(label), names) for label in p.labels]
        width = max(len(s) for s in labels)
        for rank, (text, score) in enumerate(zip(labels, p.scores), start=1):
            lines.append(f"  {rank}. {text:<{width}}  {format_score(float(score), kind)}")
    return "\n".join(lines)


def predictions_csv(predictions, names, k, kind):
    """One row per image: path, label_i, name_i, score_i for i = 1..k, score_type."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "name", "score")]
                    + ["score_type"])
    for p in predictions:
        row = [str(p.path)]
        for label, score in zip(p.labels, p.scores):
            row += [int(label), names[int(label)], f"{float(score):.6g}"]
        writer.writerow(row + [""] * (1 + 3 * k - len(row)) + [kind])
    return out.getvalue()


# --------------------------------------------------------------------------- command line

def main(argv=None):
    """``numexp predict`` / ``python -m numexp.predict``; see the module docstring for exit codes."""
    parser = argparse.ArgumentParser(
        prog="numexp predict",
        description="Predict the classes of image files with a trained run (its config, checkpoint and "
                    "preprocessing; the training data is not needed).")
    parser.add_argument("run", metavar="RUN", help="run folder, or a checkpoint file inside one")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files (ppm, png, jpg, ...) or folders")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="classes shown per image (default: 3)")
    parser.add_argument("--out", metavar="CSV", help="also write one row per image to this CSV file")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    try:
        run = load_run(args.run)
        run.check_preprocessing()
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    files, problems, ignored = image_files(args.paths)
    try:
        predictions, bad = predict_files(run, files, args.top_k)
    except (RunError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bad = problems + bad
    k = min(args.top_k, run.num_classes)
    print(f"run {run.path}: {run.describe()}")
    print(f"top {k} of {run.num_classes} classes per image; {run.score_text()}\n")
    if predictions:
        print(format_predictions(predictions, run.class_names, run.score_kind))
    sys.stdout.flush()
    for path, reason in bad:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    sys.stderr.flush()
    note = f"; ignored {ignored} non-image file{'s' if ignored != 1 else ''} in the folders" if ignored else ""
    skipped = f", skipped {len(bad)} (missing or not readable as an image)" if bad else ""
    print(f"\npredicted {len(predictions)} image{'s' if len(predictions) != 1 else ''}{skipped}{note}")
    if args.out:
        atomic_write_text(args.out, predictions_csv(predictions, run.class_names, k, run.score_kind))
        print(f"wrote {args.out}")
    if not predictions:
        print("error: no image could be predicted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
