"""One training run: ``train(cfg) -> summary`` builds everything from a composed config,
trains epoch by epoch and writes the run folder (see :mod:`numexp.rundir`).

Randomness: ``seed`` is split with ``np.random.SeedSequence`` into independent streams for
weight init (and dropout masks) and for batch order / augmentation; nothing uses numpy's
global state, so the same config gives bit-identical metrics on the same machine.

Resume: after every epoch the run saves ``last.npz`` (model, optimizer state, the best model,
generator states, metrics so far); ``resume=true`` continues from it, and because every piece
of state is restored exactly the resumed run writes the same metrics as an uninterrupted one.
"""
import logging
import math
import os
import platform
import signal
import socket
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from PIL import Image
from threadpoolctl import threadpool_info, threadpool_limits

from numexp import (allocator, blas, blas_idle, config, data, kernels_choice, losses, models, nn, optim, parallel,
                    provenance, schedules)
from numexp.rundir import CHECKPOINT, GIT_DIFF, RunDir, RunDirError, check_same_run
from numexp.summary import layer_summary

log = logging.getLogger(__name__)


RESULT_KEYS = ["best_epoch", "val_acc", "test_acc", "final_val_acc", "final_test_acc", "epochs_run",
               "stopped_early"]
# Test-only fault injection: NUMEXP_INJECT_FAULT="[kill:]EPOCH:STEP[@OVERRIDE]" raises InjectedFault at
# that training step (1-based) in runs whose command-line overrides include OVERRIDE (every run
# without one); with "kill:" the process SIGKILLs itself instead, like the out-of-memory killer.
# The reliability tests use it to make one job of a sweep fail for real.
FAULT_ENV = "NUMEXP_INJECT_FAULT"


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class InjectedFault(RuntimeError):
    """Raised on purpose through ``$NUMEXP_INJECT_FAULT`` (tests only)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be (:func:`numexp.__main__.stop_on_sigterm`)."""

    def __init__(self, signum=signal.SIGTERM):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopSweep(BaseException):
    """A multirun job's run failed under ``fail_fast=true``: stop the sweep.

    A BaseException because Hydra's ``run_job`` keeps an ``Exception`` as the job's result and only
    raises it after the whole batch of jobs has run; this one reaches the launcher at once (joblib
    then stops the other workers) and :mod:`numexp.__main__` ends the sweep with its summary.
    """


@dataclass
class Best:
    """The best-by-validation model so far (its state dict is kept in memory for restores)."""
    epoch: int = 0
    val_acc: float = -math.inf
    test_acc: float = math.nan
    state: dict = field(default=None, repr=False)
    # test-set confusion counts of this model (K x K, rows true class)
    confusion: np.ndarray = field(default=None, repr=False)


def train(cfg, out_dir=None):
    """Train the run described by ``cfg`` into ``out_dir`` (default: Hydra's output dir).

    A failing run does not raise: its summary (returned and written to ``summary.json``) has
    ``status`` ``failed`` or ``diverged`` and an ``error`` message; the traceback of an
    unexpected error is logged. Only an interrupt (Ctrl-C) propagates, after being recorded.

    With ``cfg.resume`` a completed run of the same config is returned as it is, and an
    unfinished one continues from its ``last.npz``.

    Returns:
        summary: dict with status, best_epoch, val_acc and test_acc of the best-by-val model,
        final_val_acc, final_test_acc, train_seconds (the epoch loop, summed over resumed
        sessions), wall_seconds (this session, with data loading), seed, threads, overrides,
        config_hash, machine, data info (incl. normalisation mean/std), ...

    Raises:
        RunDirError: the folder already holds run files and ``resume`` is off, or it holds a run
            of another config. Nothing is written then.
    """
    run = RunDir(out_dir if out_dir is not None else HydraConfig.get().runtime.output_dir)
    resume = bool(cfg.get("resume", False))
    run_hash = config.config_hash(cfg)
    if resume:
        check_same_run(run.path, run_hash, config.identity(cfg))
        done = run.read_summary()
        if done is not None and done.get("status") == "completed":
            run.remove_state()  # a kill between the summary and this removal leaves it behind
            log.info("already completed (config %s): nothing to do -> %s", run_hash, run.path)
            return done
        run.remove_temp_files()
    elif run.run_files():
        raise RunDirError(f"run folder {run.path} already holds {', '.join(run.run_files())}: add resume=true "
                          f"to continue that run, or choose another folder")
    git, diff = provenance.git_info()
    if diff:
        run.write_text(GIT_DIFF, diff)
    # keys in reading order; the metrics are filled in as the run goes
    summary = {"status": "running", "error": None, **dict.fromkeys(RESULT_KEYS), "train_seconds": None,
               "wall_seconds": None, "seed": int(cfg.seed), "threads": int(cfg.threads), "blas": None,
               "overrides": _overrides(), "config_hash": run_hash, "resumed_from_epochs": [],
               "tags": list(cfg.get("tags") or []), "notes": cfg.get("notes") or "",
               "start_time": provenance.now_iso(), "end_time": None,
               "numexp": {"version": provenance.numexp_version(), "git": git}, "machine": machine_info()}
    start = time.perf_counter()
    trainer = None
    write_status(run, "running", planned_epochs(cfg))
    try:
        config.validate(cfg)
        with threadpool_limits(limits=int(cfg.threads)):
            summary["blas"] = _blas_threads()
            trainer = Trainer(cfg, run, run_hash)
            with threadpool_limits(limits=trainer.blas_threads):  # 1 when the replicas use the cores
                summary["blas"] = _blas_threads()
                summary.update(trainer.describe())
                if resume:
                    trainer.restore()
                summary["resumed_from_epochs"] = trainer.resumed_from
                trainer.fit()
        summary["status"] = "completed"
    except Diverged as e:
        _fail(summary, "diverged", str(e))
    except (config.ConfigError, data.DataError, nn.CheckpointError) as e:
        _fail(summary, "failed", str(e))
    except Exception as e:
        log.exception("run failed")  # an unexpected error: keep the traceback in the run's log
        summary["status"], summary["error"] = "failed", f"{type(e).__name__}: {e}"
    except KeyboardInterrupt as e:
        _fail(summary, "interrupted", str(e) or "interrupted by the user")
        raise
    finally:
        if trainer is not None:
            trainer.close()
            summary.update(trainer.results())
        summary["wall_seconds"] = round(time.perf_counter() - start, 3)
        summary["end_time"] = provenance.now_iso()
        run.write_summary(summary)
        write_status(run, summary["status"], planned_epochs(cfg), trainer)
    if summary["status"] == "completed":
        run.remove_state()  # after the summary: the run is recorded as complete before its state goes
    _log_summary(summary, run.path)
    return summary


def task(cfg):
    """The ``@hydra.main`` task: :func:`train`, and in a single run a failure makes the exit code 1.

    In a multirun the job returns normally even when its run failed, because Hydra 1.3 skips
    ``on_multirun_end`` (where ``runs.csv`` is written) once any job raised; the
    :class:`numexp.callbacks.CollectRuns` callback sets the exit code instead. With
    ``fail_fast=true`` a failed run raises :class:`StopSweep`, which ends the sweep.

    Returns:
        the run's summary; in a multirun under Optuna's sweeper (``hydra/sweeper=search``) the float
        the study optimises instead: the run's ``val_acc``, or 0.0 for a run that did not complete
        (failed, diverged) or has no validation split.

    Note:
        A run that did not complete scores 0.0, the worst accuracy, rather than failing its trial:
        hydra-optuna-sweeper stops the whole sweep on a NaN objective, and on a job that raised
        (unless ``max_failure_rate`` allows it), and Hydra then skips ``runs.csv``. 0.0 also steers
        TPE away from a diverging lr; ``runs.csv`` keeps the run's real status.
    """
    _warnings_to_log()
    summary = train(cfg)
    hydra_cfg = HydraConfig.get()
    if summary["status"] != "completed" and hydra_cfg.mode == RunMode.RUN:
        raise SystemExit(1)
    if summary["status"] != "completed" and cfg.get("fail_fast"):
        raise StopSweep(f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}) {summary['status']}: "
                        f"{summary['error']}")
    if hydra_cfg.mode == RunMode.MULTIRUN and str(hydra_cfg.sweeper.get("_target_")).endswith(".OptunaSweeper"):
        completed = summary["status"] == "completed" and summary["val_acc"] is not None
        return float(summary["val_acc"]) if completed else 0.0
    return summary


class Trainer:
    """The epoch loop: train, evaluate on val and test, keep the best model, follow the schedule."""

    def __init__(self, cfg, run, config_hash=None):
        self.cfg, self.run = cfg, run
        self.config_hash = config_hash if config_hash is not None else config.config_hash(cfg)
        self.ds = data.load(cfg.data.name, **config.options(cfg.data))
        init_seq, batch_seq = np.random.SeedSequence(int(cfg.seed)).spawn(2)
        self.init_rng = np.random.default_rng(init_seq)
        self.model = build_model(cfg, self.ds, self.init_rng)
        self.model.set_input_grad(False)  # nobody needs the gradient of the images
        self.batch_rng = np.random.default_rng(batch_seq)
        self.loss_fn, self.opt, self.schedule, self.augment = build_components(cfg, self.model)
        # the cores go to data-parallel replicas, to BLAS, or to both (every backward here is followed
        # by a step, so large Linear layers may take the update inside it)
        self.net, self.layout = parallel.parallelize(self.model, cfg.threads, self.opt)
        self.blas_threads = self.layout["blas_threads"]
        self.best = Best()
        self.stopped_early = False
        self.epochs = planned_epochs(cfg)
        self.epochs_done = 0
        self.resumed_from = []
        self.train_seconds = 0.0  # of earlier sessions, when resumed
        self.fault = _injected_fault()
        log.info("%r; %s: %s params; %s, %s, lr %g, reg %g, schedule %s, batch %d, %d epochs, seed %d",
                 self.ds, cfg.model.name, f"{self.model.num_params():,}", cfg.optim.name, cfg.loss.name,
                 cfg.lr, cfg.reg, cfg.schedule.name, cfg.batch_size, cfg.epochs, cfg.seed)
        log.info("%s layers:\n%s", cfg.model.name, layer_summary(self.model))

    def describe(self):
        """What the summary records about the model and the data (normalisation included, so the
        checkpoint can be used on new images later)."""
        return {"model": {"name": self.cfg.model.name, "num_params": int(self.model.num_params())},
                "parallel": dict(self.layout),
                "allocator": dict(allocator.decision),
                "data": {**self.ds.info, "class_names": list(self.ds.class_names)},
                "checkpoint": CHECKPOINT}

    def close(self):
        if self.net is not self.model:
            self.net.close()

    def fit(self):
        fit_start = time.perf_counter()
        try:
            if self.epochs_done and self.should_stop(self.epochs_done):
                self.stopped_early = True  # the stop rule fired just before the previous session ended
                return
            for epoch in range(self.epochs_done, self.epochs):
                if self.schedule.restores_best(epoch) and self.best.state is not None:
                    self.model.load_state_dict(self.best.state)
                    log.info("restored the best model (epoch %d) before the lr drop", self.best.epoch)
                self.opt.lr = self.schedule.lr_at(epoch)
                self.run_epoch(epoch + 1, fit_start)
                if self.should_stop(epoch + 1):
                    self.stopped_early = True
                    log.info("early stop: val_acc has not improved for %d epochs", self.cfg.patience)
                    break
        finally:
            self.train_seconds += time.perf_counter() - fit_start

    def run_epoch(self, epoch, fit_start=None):
        """Train one epoch (1-based ``epoch``), evaluate, write its metrics row, keep the best model,
        save the resume state."""
        start = time.perf_counter()
        train_loss, train_acc = self.train_epoch(epoch)
        val_acc = self.accuracy(self.predict(self.ds.x_val), self.ds.y_val)
        test_pred = self.predict(self.ds.x_test)
        test_acc = self.accuracy(test_pred, self.ds.y_test)
        row = {"epoch": epoch, "lr": self.opt.lr, "train_loss": train_loss, "train_acc": train_acc,
               "val_acc": val_acc, "test_acc": test_acc, "seconds": round(time.perf_counter() - start, 3)}
        self.run.add_metrics(row)
        self.epochs_done = epoch
        if val_acc > self.best.val_acc:
            k = self.ds.num_classes
            matrix = np.bincount(self.ds.y_test * k + test_pred, minlength=k * k).reshape(k, k)
            self.best = Best(epoch, val_acc, test_acc, self.model.state_dict(), matrix.astype(np.int64))
            self.run.save_checkpoint(self.best.state)
            if len(self.ds.y_test):
                self.run.save_confusion(self.best.confusion)
        elapsed = time.perf_counter() - (fit_start if fit_start is not None else start)
        self.run.save_state(*self.state(self.train_seconds + elapsed))
        write_status(self.run, "running", self.epochs, self)
        log.info("epoch %d/%d  lr %.2e  loss %.4f  train %.4f  val %.4f  test %.4f  %.1fs%s",
                 epoch, self.epochs, row["lr"], train_loss, train_acc, val_acc, test_acc, row["seconds"],
                 "  *" if self.best.epoch == epoch else "")

    def train_epoch(self, epoch):
        """One pass over the training set; returns (mean loss, accuracy of the training-mode scores)."""
        self.net.train()
        total_loss, correct, seen = 0.0, 0, 0
        batches = data.batches(self.ds.x_train, self.ds.y_train, int(self.cfg.batch_size),
                               rng=self.batch_rng, augment=self.augment)
        max_steps = int(self.cfg.get("max_steps", 0))
        for step, (xb, yb) in enumerate(batches, start=1):
            if max_steps and step > max_steps:
                break
            if self.fault and self.fault[:2] == (epoch, step):
                if self.fault[2]:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise InjectedFault(f"injected fault at epoch {epoch}, step {step} (${FAULT_ENV})")
            # overflow is reported once, as divergence below, instead of as numpy warnings
            with np.errstate(over="ignore", invalid="ignore"):
                scores = self.net(xb)
                loss, dscores = self.loss_fn(scores, yb)
            if not math.isfinite(loss):
                raise Diverged(f"loss became {loss} in epoch {epoch}, step {step} (lr {self.opt.lr:g}): "
                               f"try a smaller lr")
            self.net.backward(dscores)
            self.opt.step()
            total_loss += loss * len(yb)
            correct += int(np.count_nonzero(scores.argmax(axis=1) == yb))
            seen += len(yb)
        return total_loss / seen, correct / seen

    def predict(self, x):
        """Predicted classes in eval mode, in batches of ``eval_batch_size``. Shape: (N, ...) -> (N,)."""
        self.net.eval()
        size = int(self.cfg.eval_batch_size)
        parts = [self.net(x[i:i + size]).argmax(axis=1) for i in range(0, len(x), size)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @staticmethod
    def accuracy(pred, y):
        """Share of correct predictions; NaN for an empty split."""
        return int(np.count_nonzero(pred == y)) / len(y) if len(y) else math.nan

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
                "stopped_early": self.stopped_early, "train_seconds": round(self.train_seconds, 3)}

    # ---- resume state

    def generators(self):
        """Every random generator the run draws from: batch order/augmentation, then the model's
        (init and dropout), in module order."""
        found = {id(self.batch_rng): self.batch_rng, id(self.init_rng): self.init_rng}
        for _, module in self.model.named_modules():
            rng = getattr(module, "rng", None)
            if isinstance(rng, np.random.Generator):
                found.setdefault(id(rng), rng)
        return list(found.values())

    def state(self, train_seconds):
        """``(arrays, meta)`` for ``last.npz``: everything :meth:`restore` needs to continue exactly.

        Arrays: ``model/<name>`` (parameters and buffers), ``best/<name>`` (unless the best model
        is the current one), ``optim/<param>`` or ``optim/<param>/<slot>`` (optimizer state),
        ``confusion`` (of the best model). Meta: epochs done, metrics rows, best-model facts,
        optimizer step count, generator states (``bit_generator.state`` dicts, as JSON).
        """
        arrays = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        best_is_current = self.best.epoch == self.epochs_done
        if self.best.state is not None and not best_is_current:
            arrays.update((f"best/{k}", v) for k, v in self.best.state.items())
        for name, value in self.opt.state.items():
            if isinstance(value, dict):
                arrays.update((f"optim/{name}/{slot}", v) for slot, v in value.items())
            else:
                arrays[f"optim/{name}"] = value
        if self.best.confusion is not None:
            arrays["confusion"] = self.best.confusion
        meta = {"config_hash": self.config_hash, "epochs_done": self.epochs_done, "metrics": self.run.metrics,
                "best": {"epoch": self.best.epoch, "val_acc": _finite(self.best.val_acc),
                         "test_acc": _finite(self.best.test_acc), "is_current": best_is_current},
                "optim_steps": self.opt.steps, "generators": [g.bit_generator.state for g in self.generators()],
                "train_seconds": round(train_seconds, 3), "resumed_from_epochs": self.resumed_from}
        return arrays, meta

    def restore(self):
        """Continue from the folder's ``last.npz`` if it has one; rewrite metrics.csv, checkpoint.npz
        and confusion.csv from it (a kill may have left them one epoch ahead or behind).

        Raises:
            numexp.nn.CheckpointError: the state file is unreadable, pickled, or does not fit the model.
        """
        loaded = self.run.load_state()
        if loaded is None:
            log.info("resume: no last.npz in %s, starting from the first epoch", self.run.path)
            return
        arrays, meta = loaded
        where = self.run.path / "last.npz"
        if meta.get("config_hash") != self.config_hash:
            raise nn.CheckpointError(f"{where} belongs to a run of another config ({meta.get('config_hash')}, "
                                     f"this run is {self.config_hash})")
        try:
            best = meta["best"]
            if best["epoch"] and not best["is_current"]:
                self.model.load_state_dict(_prefixed(arrays, "best/"))  # checks its keys and shapes
            self.model.load_state_dict(_prefixed(arrays, "model/"))
            if best["epoch"]:
                state = self.model.state_dict() if best["is_current"] else _prefixed(arrays, "best/")
                self.best = Best(best["epoch"], _nan_if_none(best["val_acc"]), _nan_if_none(best["test_acc"]),
                                 state, arrays.get("confusion"))
            self.opt.state = _optimizer_state(arrays)
            self.opt.steps = int(meta["optim_steps"])
            generators = self.generators()
            if len(meta["generators"]) != len(generators):
                raise ValueError(f"{len(meta['generators'])} generator states for {len(generators)} generators")
            for rng, rng_state in zip(generators, meta["generators"]):
                rng.bit_generator.state = rng_state
            self.run.metrics = [dict(row) for row in meta["metrics"]]
            self.epochs_done = int(meta["epochs_done"])
            self.train_seconds = float(meta.get("train_seconds") or 0.0)
            self.resumed_from = [int(e) for e in meta.get("resumed_from_epochs", [])]
        except (KeyError, ValueError, TypeError) as e:
            raise nn.CheckpointError(f"resume state {where} does not fit this run ({type(e).__name__}: {e}); "
                                     f"delete it to restart the run from scratch") from None
        self.run.write_metrics()
        if self.best.state is not None:
            self.run.save_checkpoint(self.best.state)
            if self.best.confusion is not None and len(self.ds.y_test):
                self.run.save_confusion(self.best.confusion)
        self.resumed_from.append(self.epochs_done)
        log.info("resumed from epoch %d of %d (best so far: epoch %d, val %.4f)", self.epochs_done,
                 self.cfg.epochs, self.best.epoch, self.best.val_acc)


def _prefixed(arrays, prefix):
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _optimizer_state(arrays):
    """``optim/<param>`` -> array, ``optim/<param>/<slot>`` -> {slot: array} (the optimizers' layout)."""
    state = {}
    for key, value in _prefixed(arrays, "optim/").items():
        name, _, slot = key.partition("/")
        if slot:
            state.setdefault(name, {})[slot] = value
        else:
            state[name] = value
    return state


def _nan_if_none(x):
    return math.nan if x is None else x


def build_model(cfg, ds, rng):
    """The configured model for ``ds``'s input shape; a model that cannot fit is a config error."""
    try:
        return models.build(cfg.model.name, in_shape=ds.in_shape, num_classes=ds.num_classes, rng=rng,
                            **config.options(cfg.model))
    except models.ModelError as e:
        raise config.model_misfit(cfg, ds.in_shape, e) from None


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


def planned_epochs(cfg):
    """The epochs this run will train: ``epochs``, capped by ``max_epochs`` when set; None while the
    config is incomplete (it is then refused by validation)."""
    try:
        epochs, cap = int(cfg.epochs), int(cfg.get("max_epochs", 0))
    except Exception:  # noqa: BLE001 - a missing or mistyped value, reported by config.validate
        return None
    return min(epochs, cap) if cap > 0 else epochs


def write_status(run, state, epochs, trainer=None):
    """``status.json``: where the run stands, for ``numexp status`` from another terminal or machine.

    ``host`` and ``pid`` let it tell a run that is still going from one whose process was killed."""
    rows = trainer.run.metrics if trainer is not None else []
    best = trainer.best.val_acc if trainer is not None else -math.inf
    run.write_status({"state": state, "epoch": len(rows), "epochs": epochs, "best_val_acc": _finite(best),
                      "seconds_per_epoch": round(sum(r["seconds"] for r in rows) / len(rows), 3) if rows else None,
                      "host": socket.gethostname(), "pid": os.getpid(), "updated": provenance.now_iso()})


def machine_info():
    """Where the run ran: CPU model, core count, Python and numpy versions, host name."""
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "hostname": socket.gethostname()}


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _injected_fault():
    """(epoch, step, kill) at which this run must fail, from ``$NUMEXP_INJECT_FAULT``; None normally."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kill = spec.startswith("kill:")
    where, _, override = spec.removeprefix("kill:").partition("@")
    if override and override not in _overrides():
        return None
    epoch, step = (int(part) for part in where.split(":"))
    return epoch, step, kill


def _warnings_to_log():
    """In a job (this process is numexp's): warnings such as a rebuilt cache or skipped image files
    become one-line log records, on the console and in the run's log."""
    logging.captureWarnings(True)
    warnings.formatwarning = _one_line_warning
    # the loaders refuse such images with a DataError naming the file; Pillow's warning would repeat it
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"{category.__name__}: {message}"


def _overrides():
    """The command-line overrides of this job (empty outside Hydra)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _blas_threads():
    """Threads in effect and kernels in use per BLAS library, e.g.
    ``[{"library": "openblas", "num_threads": 1, "architecture": "Haswell", "kernels_choice": {...}}]``.

    ``kernels_choice`` says whose choice OpenBLAS's kernels are and why (:mod:`numexp.kernels_choice`),
    ``thread_timeout`` the same of how long its idle threads spin (:mod:`numexp.blas_idle`);
    ``direct_gemm`` whether FC updates go through :mod:`numexp.blas` (its source) or NumPy. Both keep
    timings comparable across machines."""
    return [{"library": i["internal_api"], "num_threads": i["num_threads"], "architecture": i.get("architecture"),
             **({"kernels_choice": dict(kernels_choice.decision), "thread_timeout": dict(blas_idle.decision),
                 "direct_gemm": blas.source()}
                if i["internal_api"] == "openblas" else {})}
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
