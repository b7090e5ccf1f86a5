"""One training run: ``train(cfg) -> summary`` builds everything from a composed config,
trains epoch by epoch and writes the run folder (see :mod:`numexp.rundir`).

Randomness: ``seed`` is split with ``np.random.SeedSequence`` into independent streams for
weight init (and dropout masks) and for batch order / augmentation; nothing uses numpy's
global state, so the same config gives bit-identical metrics on the same machine.
"""
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from threadpoolctl import threadpool_info, threadpool_limits

from numexp import config, data, losses, models, optim, schedules
from numexp.rundir import CHECKPOINT, RunDir

log = logging.getLogger(__name__)


RESULT_KEYS = ["best_epoch", "val_acc", "test_acc", "final_val_acc", "final_test_acc", "epochs_run",
               "stopped_early"]


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Best:
    """The best-by-validation model so far (its state dict is kept in memory for restores)."""
    epoch: int = 0
    val_acc: float = -math.inf
    test_acc: float = math.nan
    state: dict = field(default=None, repr=False)


def train(cfg, out_dir=None):
    """Train the run described by ``cfg`` into ``out_dir`` (default: Hydra's output dir).

    A failing run does not raise: its summary (returned and written to ``summary.json``) has
    ``status`` ``failed`` or ``diverged`` and an ``error`` message; the traceback of an
    unexpected error is logged. Only an interrupt (Ctrl-C) propagates, after being recorded.

    Returns:
        summary: dict with status, best_epoch, val_acc and test_acc of the best-by-val model,
        final_val_acc, final_test_acc, train_seconds (the epoch loop), wall_seconds (with data
        loading), seed, threads, overrides, data info (incl. normalisation mean/std), ...
    """
    run = RunDir(out_dir if out_dir is not None else HydraConfig.get().runtime.output_dir)
    # keys in reading order; the metrics are filled in as the run goes
    summary = {"status": "running", "error": None, **dict.fromkeys(RESULT_KEYS), "train_seconds": None,
               "wall_seconds": None, "seed": int(cfg.seed), "threads": int(cfg.threads), "blas": None,
               "overrides": _overrides()}
    start = time.perf_counter()
    trainer = None
    try:
        config.validate(cfg)
        with threadpool_limits(limits=int(cfg.threads)):
            summary["blas"] = _blas_threads()
            trainer = Trainer(cfg, run)
            summary.update(trainer.describe())
            fit_start = time.perf_counter()
            try:
                trainer.fit()
            finally:
                summary["train_seconds"] = round(time.perf_counter() - fit_start, 3)
        summary["status"] = "completed"
    except Diverged as e:
        _fail(summary, "diverged", str(e))
    except (config.ConfigError, data.DataError) as e:
        _fail(summary, "failed", str(e))
    except Exception as e:
        log.exception("run failed")  # an unexpected error: keep the traceback in the run's log
        summary["status"], summary["error"] = "failed", f"{type(e).__name__}: {e}"
    except KeyboardInterrupt:
        _fail(summary, "interrupted", "interrupted by the user")
        raise
    finally:
        if trainer is not None:
            summary.update(trainer.results())
        summary["wall_seconds"] = round(time.perf_counter() - start, 3)
        run.write_summary(summary)
    _log_summary(summary, run.path)
    return summary


def task(cfg):
    """The ``@hydra.main`` task: :func:`train`, and in a single run a failure makes the exit code 1.

    In a multirun the job returns normally even when its run failed, because Hydra 1.3 skips
    ``on_multirun_end`` (where ``runs.csv`` is written) once any job raised; the
    :class:`numexp.callbacks.CollectRuns` callback sets the exit code instead.
    """
    summary = train(cfg)
    if summary["status"] != "completed" and HydraConfig.get().mode == RunMode.RUN:
        raise SystemExit(1)
    return summary


class Trainer:
    """The epoch loop: train, evaluate on val and test, keep the best model, follow the schedule."""

    def __init__(self, cfg, run):
        self.cfg, self.run = cfg, run
        self.ds = data.load(cfg.data.name, **config.options(cfg.data))
        init_seq, batch_seq = np.random.SeedSequence(int(cfg.seed)).spawn(2)
        self.model = build_model(cfg, self.ds, np.random.default_rng(init_seq))
        self.model.set_input_grad(False)  # nobody needs the gradient of the images
        self.batch_rng = np.random.default_rng(batch_seq)
        self.loss_fn, self.opt, self.schedule, self.augment = build_components(cfg, self.model)
        self.best = Best()
        self.stopped_early = False
        log.info("%r; %s: %s params; %s, %s, lr %g, reg %g, schedule %s, batch %d, %d epochs, seed %d",
                 self.ds, cfg.model.name, f"{self.model.num_params():,}", cfg.optim.name, cfg.loss.name,
                 cfg.lr, cfg.reg, cfg.schedule.name, cfg.batch_size, cfg.epochs, cfg.seed)

    def describe(self):
        """What the summary records about the model and the data (normalisation included, so the
        checkpoint can be used on new images later)."""
        return {"model": {"name": self.cfg.model.name, "num_params": int(self.model.num_params())},
                "data": {**self.ds.info, "class_names": list(self.ds.class_names)},
                "checkpoint": CHECKPOINT}

    def fit(self):
        for epoch in range(int(self.cfg.epochs)):
            if self.schedule.restores_best(epoch) and self.best.state is not None:
                self.model.load_state_dict(self.best.state)
                log.info("restored the best model (epoch %d) before the lr drop", self.best.epoch)
            self.opt.lr = self.schedule.lr_at(epoch)
            self.run_epoch(epoch + 1)
            if self.should_stop(epoch + 1):
                self.stopped_early = True
                log.info("early stop: val_acc has not improved for %d epochs", self.cfg.patience)
                break

    def run_epoch(self, epoch):
        """Train one epoch (1-based ``epoch``), evaluate, write its metrics row, keep the best model."""
        start = time.perf_counter()
        train_loss, train_acc = self.train_epoch(epoch)
        val_acc = self.accuracy(self.ds.x_val, self.ds.y_val)
        test_acc = self.accuracy(self.ds.x_test, self.ds.y_test)
        row = {"epoch": epoch, "lr": self.opt.lr, "train_loss": train_loss, "train_acc": train_acc,
               "val_acc": val_acc, "test_acc": test_acc, "seconds": round(time.perf_counter() - start, 3)}
        self.run.add_metrics(row)
        if val_acc > self.best.val_acc:
            self.best = Best(epoch, val_acc, test_acc, self.model.state_dict())
            self.run.save_checkpoint(self.best.state)
        log.info("epoch %d/%d  lr %.2e  loss %.4f  train %.4f  val %.4f  test %.4f  %.1fs%s",
                 epoch, self.cfg.epochs, row["lr"], train_loss, train_acc, val_acc, test_acc, row["seconds"],
                 "  *" if self.best.epoch == epoch else "")

    def train_epoch(self, epoch):
        """One pass over the training set; returns (mean loss, accuracy of the training-mode scores)."""
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        batches = data.batches(self.ds.x_train, self.ds.y_train, int(self.cfg.batch_size),
                               rng=self.batch_rng, augment=self.augment)
        for step, (xb, yb) in enumerate(batches, start=1):
            # overflow is reported once, as divergence below, instead of as numpy warnings
            with np.errstate(over="ignore", invalid="ignore"):
                scores = self.model(xb)
                loss, dscores = self.loss_fn(scores, yb)
            if not math.isfinite(loss):
                raise Diverged(f"loss became {loss} in epoch {epoch}, step {step} (lr {self.opt.lr:g}): "
                               f"try a smaller lr")
            self.model.backward(dscores)
            self.opt.step()
            total_loss += loss * len(yb)
            correct += int(np.count_nonzero(scores.argmax(axis=1) == yb))
            seen += len(yb)
        return total_loss / seen, correct / seen

    def accuracy(self, x, y):
        """Accuracy in eval mode, in batches of ``eval_batch_size``; NaN for an empty split."""
        if len(y) == 0:
            return math.nan
        self.model.eval()
        size = int(self.cfg.eval_batch_size)
        correct = sum(int(np.count_nonzero(self.model(x[i:i + size]).argmax(axis=1) == y[i:i + size]))
                      for i in range(0, len(y), size))
        return correct / len(y)

    def should_stop(self, epoch):
        """The plateau rule: ``patience`` epochs in a row without a better val_acc."""
        patience = int(self.cfg.patience)
        return patience > 0 and epoch - self.best.epoch >= patience

    def results(self):
        """Best and final metrics for the summary (whatever has been reached so far)."""
        last = self.run.metrics[-1] if self.run.metrics else {}
        return {"best_epoch": self.best.epoch or None, "val_acc": _finite(self.best.val_acc),
                "test_acc": _finite(self.best.test_acc), "final_val_acc": last.get("val_acc"),
                "final_test_acc": last.get("test_acc"), "epochs_run": len(self.run.metrics),
                "stopped_early": self.stopped_early}


def build_model(cfg, ds, rng):
    """The configured model for ``ds``'s input shape; a model that cannot fit is a config error."""
    try:
        return models.build(cfg.model.name, in_shape=ds.in_shape, num_classes=ds.num_classes, rng=rng,
                            **config.options(cfg.model))
    except models.ModelError as e:
        raise config.ConfigError(f"model={cfg.model.name} does not fit data={cfg.data.name} "
                                 f"(input {ds.in_shape}): {e}. Pick another model or data.size") from None


def build_components(cfg, model):
    """(loss, optimizer, schedule, augmenter); an impossible option is a config error naming the group."""
    parts = {}
    for group, make in (("loss", lambda: losses.build(cfg.loss.name, **config.options(cfg.loss))),
                        ("optim", lambda: optim.build(cfg.optim.name, model, lr=float(cfg.lr), reg=float(cfg.reg),
                                                      **config.options(cfg.optim))),
                        ("schedule", lambda: schedules.build(cfg.schedule.name, float(cfg.lr), int(cfg.epochs),
                                                             **config.options(cfg.schedule))),
                        ("augment", lambda: data.make_augment(list(cfg.augment.names), int(cfg.augment.padding)))):
        try:
            parts[group] = make()
        except (TypeError, ValueError) as e:
            raise config.ConfigError(f"{group}: {e}") from None
    return parts["loss"], parts["optim"], parts["schedule"], parts["augment"]


def _overrides():
    """The command-line overrides of this job (empty outside Hydra)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _blas_threads():
    """Threads in effect per BLAS library, e.g. ``[{"library": "openblas", "num_threads": 1}]``."""
    return [{"library": i["internal_api"], "num_threads": i["num_threads"]}
            for i in threadpool_info() if i["user_api"] == "blas"]


def _fail(summary, status, error):
    """Record an expected failure; its message is complete, so one log line and no traceback."""
    summary["status"], summary["error"] = status, error
    log.error("%s: %s", status, error)


def _finite(x):
    return x if math.isfinite(x) else None


def _log_summary(summary, path):
    if summary["status"] == "completed":
        log.info("completed: best epoch %s  val %s  test %s  (final test %s)  %.1fs  -> %s",
                 summary["best_epoch"], _fmt(summary["val_acc"]), _fmt(summary["test_acc"]),
                 _fmt(summary["final_test_acc"]), summary["wall_seconds"], path)


def _fmt(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"
