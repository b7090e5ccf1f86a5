"""Evaluate a trained run on a data split: accuracy, per-class table, confusion matrix, mistakes.

    numexp eval RUN                                  # the run's own test split
    numexp eval RUN split=val --out val_eval
    numexp eval RUN data.fraction=1.0                # the whole test set instead of the run's subset
    python -m numexp.evaluate RUN

The model is rebuilt from the run folder (:func:`numexp.predict.load_run`); the data are loaded
with the run's data config, changed by any ``data=NAME`` / ``data.KEY=VALUE`` overrides, and
the chosen ``split`` (test, val or train) is scored in eval mode exactly as the trainer scores
it (same batches, same BLAS thread count), so a finished run's checkpoint on its own test
split gives exactly the ``test_acc`` in its ``summary.json``.

Data loaded with other options than the run's (another fraction, another data set) are
normalised with their own training split's statistics; they are brought back to the run's
normalisation, so the model sees its inputs as in training.

Writes into ``--out`` (default ``RUN/eval/<split>/``):

- ``eval.json``: what was evaluated, accuracy, macro precision and recall, and whether the
  recorded ``test_acc`` was reproduced;
- ``per_class.csv``: label, name, precision, recall, support, predicted, correct per class;
- ``confusion_matrix.csv`` (rows true, columns predicted) and ``confusion.png`` (class names);
- ``mistakes.png``: the worst mistakes, the wrong predictions with the highest scores;
- ``predictions.png``: a seeded sample of images with true and predicted names, mistakes in red
  (:func:`prediction_grid`, also for reports: :func:`run_prediction_grid`).
"""
import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from numexp import report
from numexp.predict import RunError, batch_scores, class_label, load_run
from numexp.rundir import atomic_write_text, to_builtin

SPLITS = ("test", "val", "train")
EVAL_DIR = "eval"
# wrong predictions shown in mistakes.png, images in predictions.png
N_MISTAKES = 24
N_SAMPLE = 32
GRID_COLUMNS = 8
CORRECT_COLOUR, WRONG_COLOUR = "#1a7f37", "#cf222e"


class EvalError(Exception):
    """Data that cannot be evaluated with the run's model, or a bad override; the message says why."""


@dataclass
class Evaluation:
    """The scores of one run on one data split.

    Attributes:
        x: (N, C, H, W) float32 images in the run's normalisation; y: (N,) true labels.
        scores: (N, K) raw model scores; outputs: (N, K) as reported (softmax probabilities for a
            softmax head, else the scores); pred: (N,) predicted labels.
        data_name, data_options: the data set and loader options evaluated; overridden: whether
            they differ from the run's.
    """
    run: object
    split: str
    data_name: str
    data_options: dict
    overridden: bool
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)

    @property
    def outputs(self):
        return self.run.outputs(self.scores)

    @property
    def pred(self):
        return self.scores.argmax(axis=1) if len(self.y) else np.zeros(0, dtype=np.int64)

    @property
    def names(self):
        return self.run.class_names

    @property
    def correct(self):
        return int(np.count_nonzero(self.pred == self.y))

    @property
    def accuracy(self):
        """As the trainer computes it: correct / N (NaN for an empty split)."""
        return self.correct / len(self.y) if len(self.y) else float("nan")

    @property
    def recorded(self):
        """The run's recorded accuracy of this split (``test_acc``/``val_acc`` of summary.json), when
        the data are the run's own; else None."""
        if self.overridden or self.split not in ("test", "val"):
            return None
        return self.run.summary.get(f"{self.split}_acc")


# --------------------------------------------------------------------------- evaluation

def data_config(run, overrides=()):
    """The run's data config with ``data=NAME`` and ``data.KEY=VALUE`` overrides applied.

    ``data=NAME`` naming another data set starts from that data set's shipped config (composed
    with Hydra, so its schema checks the keys); ``data.KEY=VALUE`` values are parsed as YAML.

    Returns:
        the data config node.
    """
    from omegaconf import OmegaConf

    name, dotted = None, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key == "data":
            name = value
        elif sep and key.startswith("data."):
            dotted.append(item)
        else:
            raise EvalError(f"cannot override {item!r}: eval takes data=NAME, data.KEY=VALUE and split=NAME")
    if name is None or name == run.cfg.data.name:
        node = run.cfg.data
        return OmegaConf.merge(node, OmegaConf.from_dotlist(dotted).data) if dotted else node
    return _compose_data([f"data={name}", *dotted])


def _compose_data(overrides):
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from numexp import config

    config.register()
    try:
        with initialize_config_module(config_module="numexp.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides)).data
    except (HydraException, OmegaConfBaseException) as e:
        raise EvalError(config.error_line(e)) from None


def evaluate(run, overrides=(), split="test", threads=None):
    """Score ``split`` of the run's data (with ``overrides``) with the run's model.

    Args:
        run: a :class:`numexp.predict.Run` (or a run folder path).
        overrides: ``data=NAME`` / ``data.KEY=VALUE`` strings.
        split: "test", "val" or "train".
        threads: BLAS threads; None = the run's ``threads``, as in training.

    Raises:
        EvalError: bad override or split, data whose input shape or class count does not fit.
        numexp.data.DataError: the data cannot be loaded.
    """
    from numexp import config, data

    if not hasattr(run, "model"):
        run = load_run(run)
    if split not in SPLITS:
        raise EvalError(f"split={split} is invalid: must be one of {', '.join(SPLITS)}")
    from omegaconf.errors import OmegaConfBaseException

    try:
        node = data_config(run, overrides)
        options = config.options(node)
        overridden = str(node.name) != str(run.cfg.data.name) or options != config.options(run.cfg.data)
    except OmegaConfBaseException as e:  # a value that does not parse or resolve
        raise EvalError(config.error_line(e)) from None
    ds = data.load(str(node.name), **options)
    if ds.in_shape != run.in_shape:
        raise EvalError(f"data={node.name} gives inputs of shape {ds.in_shape}, the run's model takes "
                        f"{run.in_shape}: set data.size={run.in_shape[1]} (and data.channels for image_folder)")
    if ds.num_classes != run.num_classes:
        raise EvalError(f"data={node.name} has {ds.num_classes} classes, the run's model {run.num_classes}")
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    x = renormalize(x, ds.mean, ds.std, run.mean, run.std)
    threads = run.threads if threads is None else int(threads)
    scores = batch_scores(run.model, x, run.batch_size, threads)
    if not len(scores):
        scores = np.zeros((0, run.num_classes), dtype=np.float32)
    return Evaluation(run, split, str(node.name), options, overridden, x, y, scores)


def renormalize(x, mean, std, to_mean, to_std):
    """Images normalised with (mean, std) re-expressed with (to_mean, to_std); ``x`` itself when equal
    (or when the target is unknown).

    Shape:
        x: (N, C, H, W) float32; mean, std, to_mean, to_std: (C,).
    """
    if to_mean is None or to_std is None or (np.array_equal(mean, to_mean) and np.array_equal(std, to_std)):
        return x
    shape = (1, -1, 1, 1)
    pixels = x * np.asarray(std, np.float32).reshape(shape) + np.asarray(mean, np.float32).reshape(shape)
    return ((pixels - np.asarray(to_mean, np.float32).reshape(shape))
            / np.asarray(to_std, np.float32).reshape(shape)).astype(np.float32)


def confusion_counts(y, pred, k):
    """(K, K) int64 counts, rows true label, columns predicted label."""
    return np.bincount(np.asarray(y) * k + np.asarray(pred), minlength=k * k).reshape(k, k).astype(np.int64)


def per_class(y, pred, names):
    """One row per class: label, name, precision, recall, support, predicted, correct.

    precision = correct / predicted, recall = correct / support; empty (NaN) when the
    denominator is 0.
    """
    k = len(names)
    matrix = confusion_counts(y, pred, k)
    correct = np.diag(matrix)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, correct / np.maximum(predicted, 1), np.nan)
        recall = np.where(support > 0, correct / np.maximum(support, 1), np.nan)
    return pd.DataFrame({"label": np.arange(k), "name": list(names), "precision": precision, "recall": recall,
                         "support": support, "predicted": predicted, "correct": correct})


def worst_mistakes(ev, n=N_MISTAKES):
    """Indices of the wrong predictions with the highest score for the predicted class (most confident
    first; ties by index)."""
    wrong = np.flatnonzero(ev.pred != ev.y)
    top = ev.outputs[wrong, ev.pred[wrong]]
    return wrong[np.lexsort((wrong, -top))][:n]


# --------------------------------------------------------------------------- figures

def to_display(x, mean, std):
    """Normalised images back to [0, 1] pixels for ``imshow``.

    Shape:
        x: (N, C, H, W) -> (N, H, W, 3) for colour, (N, H, W) for grey.
    """
    shape = (1, -1, 1, 1)
    if mean is not None and std is not None:
        x = x * np.asarray(std, np.float32).reshape(shape) + np.asarray(mean, np.float32).reshape(shape)
    else:  # unknown statistics: stretch each image to its own range
        lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-12)
    x = np.clip(x, 0.0, 1.0)
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def image_grid(images, titles, colours, title, ncols=GRID_COLUMNS):
    """A grid of images, each with a small title and a frame in its colour.

    Args:
        images: (N, H, W[, 3]) floats in [0, 1]; titles, colours: one per image.
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    # constrained layout keeps two-line titles clear of the row above
    fig = Figure(figsize=(1.9 * ncols, 2.0 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, text, colour in zip(axes, images, titles, colours):
        ax.set_axis_on()
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(colour)
            spine.set_linewidth(2.5)
        ax.set_title(text, fontsize=6.5, color=colour, pad=2)
    if n == 0:
        axes[0].text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(title, fontsize=9)
    return fig


def prediction_grid(x, y, pred, names, mean=None, std=None, scores=None, score_kind="probability", title=None,
                    ncols=GRID_COLUMNS):
    """Images with their true and predicted class names; mistakes framed and titled in red.

    The seed's GUI test mode as a picture, for reports: a correct image is titled with its
    class in green, a wrong one with the prediction and the truth in red.

    Args:
        x: (N, C, H, W) normalised images (``mean``/``std`` undo the normalisation for display).
        y, pred: (N,) true and predicted labels; names: class names.
        scores: optional (N,) score of each prediction, shown after its name.
        score_kind: "probability" or "margin" (how the score is printed).
    """
    titles, colours = [], []
    for i, (t, p) in enumerate(zip(np.asarray(y), np.asarray(pred))):
        score = "" if scores is None else " " + _score(float(scores[i]), score_kind)
        if t == p:
            titles.append(_wrap(class_label(int(p), names)) + score)
            colours.append(CORRECT_COLOUR)
        else:
            titles.append(f"pred {_wrap(class_label(int(p), names))}{score}\ntrue {_wrap(class_label(int(t), names))}")
            colours.append(WRONG_COLOUR)
    wrong = int(np.count_nonzero(np.asarray(y) != np.asarray(pred)))
    title = title or f"{len(y)} images, {wrong} mistakes (red)"
    return image_grid(to_display(np.asarray(x), mean, std), titles, colours, title, ncols)


def sample_indices(n_total, n, seed=0):
    """``n`` sorted indices drawn without replacement with ``seed`` (all of them when n >= n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def predictions_figure(ev, n=N_SAMPLE, seed=0):
    """:func:`prediction_grid` of a seeded sample of the evaluated split."""
    idx = sample_indices(len(ev.y), n, seed)
    pred = ev.pred[idx]
    title = (f"{ev.run.cfg.model.name} on the {ev.data_name} {ev.split} split: {len(idx)} sampled images, "
             f"{int(np.count_nonzero(pred != ev.y[idx]))} mistakes (red)\n{ev.run.path}")
    return prediction_grid(ev.x[idx], ev.y[idx], pred, ev.names, ev.run.mean, ev.run.std,
                           ev.outputs[idx, pred], ev.run.score_kind, title)


def mistakes_figure(ev, n=N_MISTAKES):
    """The ``n`` worst mistakes (highest score for a wrong class), most confident first."""
    idx = worst_mistakes(ev, n)
    pred = ev.pred[idx]
    kind = "probability" if ev.run.score_kind == "probability" else "margin"
    title = (f"{ev.run.cfg.model.name} on the {ev.data_name} {ev.split} split: the {len(idx)} most confident of "
             f"{int(np.count_nonzero(ev.pred != ev.y))} mistakes (score: {kind} of the predicted class)\n"
             f"{ev.run.path}")
    return prediction_grid(ev.x[idx], ev.y[idx], pred, ev.names, ev.run.mean, ev.run.std,
                           ev.outputs[idx, pred], ev.run.score_kind, title)


def run_prediction_grid(run_dir, n=N_SAMPLE, split="test", seed=0):
    """The prediction grid of a run folder on its own ``split``: a figure reports can embed."""
    return predictions_figure(evaluate(run_dir, split=split), n, seed)


def _score(value, kind):
    return f"{value:.2f}" if kind == "probability" else f"{value:+.2f}"


def _wrap(text, width=24):
    return report._clip(text, width)


# --------------------------------------------------------------------------- writing

def write_evaluation(ev, out):
    """Write the tables and figures of ``ev`` into ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k = ev.run.num_classes
    table = per_class(ev.y, ev.pred, ev.names)
    matrix = confusion_counts(ev.y, ev.pred, k)
    written = []

    def text(name, content):
        atomic_write_text(out / name, content)
        written.append(out / name)

    text("per_class.csv", table.to_csv(index=False, float_format="%.4f", lineterminator="\n"))
    frame = pd.DataFrame(matrix, index=pd.Index(range(k), name="true/predicted"), columns=range(k))
    text("confusion_matrix.csv", frame.to_csv(lineterminator="\n"))
    title = (f"{ev.run.cfg.model.name} on the {ev.data_name} {ev.split} split: accuracy "
             f"{report.pct(ev.accuracy)}% of {len(ev.y)}\n{ev.run.path}")
    for name, fig in (("confusion.png", report.confusion_figure(matrix, ev.names, title)),
                      ("mistakes.png", mistakes_figure(ev)), ("predictions.png", predictions_figure(ev))):
        written.append(report.save_figure(fig, out / name))
    summary = {"run": str(ev.run.path), "checkpoint": str(ev.run.checkpoint), "data": ev.data_name,
               "data_options": ev.data_options, "data_overridden": ev.overridden, "split": ev.split,
               "images": len(ev.y), "correct": ev.correct, "accuracy": ev.accuracy,
               "macro_precision": _nanmean(table["precision"]), "macro_recall": _nanmean(table["recall"]),
               "recorded_accuracy": ev.recorded,
               "reproduced": None if ev.recorded is None else ev.accuracy == ev.recorded,
               "score_type": ev.run.score_kind}
    text("eval.json", json.dumps(to_builtin(summary), indent=2) + "\n")
    return written


def _nanmean(values):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


# --------------------------------------------------------------------------- command line

def main(argv=None):
    """``numexp eval`` / ``python -m numexp.evaluate``; exit code 0, 1 when the run or data cannot be
    used, 2 for a usage error."""
    from numexp.data import DataError

    parser = argparse.ArgumentParser(
        prog="numexp eval",
        description="Evaluate a trained run on a data split: accuracy, per-class precision/recall (CSV), "
                    "confusion matrix and worst mistakes (PNG).")
    parser.add_argument("run", metavar="RUN", help="run folder, or a checkpoint file inside one")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="data=NAME, data.KEY=VALUE (default: the run's data config), split=test|val|train")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: RUN/eval/SPLIT)")
    args = parser.parse_args(argv)
    split = "test"
    overrides = []
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"expected KEY=VALUE, got {item!r}")
        if item.startswith("split="):
            split = item.partition("=")[2]
        else:
            overrides.append(item)
    try:
        run = load_run(args.run)
        ev = evaluate(run, overrides, split)
        out = Path(args.out) if args.out else run.path / EVAL_DIR / split
        written = write_evaluation(ev, out)
    except (RunError, EvalError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"run {run.path}: {run.describe()}")
    line = (f"{ev.split} split of {ev.data_name}{' (overridden data options)' if ev.overridden else ''}: "
            f"accuracy {report.pct(ev.accuracy)}% ({ev.correct}/{len(ev.y)})")
    if ev.recorded is not None:
        same = ev.accuracy == ev.recorded
        line += (f"; summary.json {ev.split}_acc {report.pct(ev.recorded)}%: "
                 f"{'reproduced exactly' if same else 'DIFFERENT (the data or code changed since the run)'}")
    print(line)
    table = per_class(ev.y, ev.pred, ev.names)
    worst = table[table["support"] > 0].sort_values(["recall", "label"]).head(5)
    if len(worst):
        print("lowest recall: " + "; ".join(f"{class_label(int(r.label), ev.names)} {report.pct(r.recall, 1)}% "
                                            f"of {int(r.support)}" for r in worst.itertuples()))
    print("wrote " + ", ".join(p.as_posix() for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
