"""A multirun's joblib workers, started while Hydra is still validating the sweep.

Hydra's joblib launcher starts its worker processes when it launches the first batch. Each then
starts Python and imports Hydra, NumPy and numexp before its first run: 0.38 s on this 2-core
machine (0.21 s to start the process, 0.17 s of imports), while the launching process had been
composing every job's config to validate the batch (about 0.07 s a job). A run one after another
in the launching process pays neither. :class:`StartWorkers` starts the workers and their imports
as soon as the multirun starts, through the same joblib settings as the launcher, so that the
launcher's ``Parallel`` finds them running (joblib keeps one reusable pool per process).

Starting them is best effort: if it fails, the launcher starts its own and reports any error there.
"""
import logging
import os
import threading

from hydra.experimental.callback import Callback
from hydra_plugins.hydra_joblib_launcher import _core as joblib_launcher_core
from joblib import Parallel, delayed, effective_n_jobs
from omegaconf import OmegaConf

# imported for its side effect in the workers: unpickling `_ready` there imports what a job needs
from numexp import trainer  # noqa: F401

log = logging.getLogger(__name__)

JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def joblib_settings(launcher_cfg):
    """The ``Parallel`` keyword arguments Hydra's joblib launcher will use for ``launcher_cfg``
    (``hydra.launcher``), or None for another launcher."""
    if launcher_cfg is None or launcher_cfg.get("_target_") != JOBLIB_LAUNCHER:
        return None
    settings = OmegaConf.to_container(launcher_cfg, resolve=True)
    settings.pop("_target_")
    settings["backend"] = "loky"  # as the launcher: its only backend
    joblib_launcher_core.process_joblib_cfg(settings)
    return settings


def _ready():
    """A job that does nothing: the worker that runs it has imported numexp and Hydra's job runner.
    Returns the worker's process id."""
    return os.getpid()


def start(launcher_cfg):
    """Start the workers of ``launcher_cfg`` in the background; returns the :class:`WorkerStart`
    thread, or None when the launcher is not joblib's or runs one job at a time (in this process)."""
    settings = joblib_settings(launcher_cfg)
    if settings is None:
        return None
    n_jobs = effective_n_jobs(settings["n_jobs"])
    if n_jobs <= 1:
        return None
    thread = WorkerStart(settings, n_jobs)
    thread.start()
    return thread


class WorkerStart(threading.Thread):
    """Runs :func:`_warm`; ``worker_pids`` holds its result once the thread has ended. A daemon: a
    command that stops early (a bad override) does not wait for it."""

    def __init__(self, settings, n_jobs):
        super().__init__(name="numexp-start-workers", daemon=True)
        self.settings, self.n_jobs, self.worker_pids = settings, n_jobs, set()

    def run(self):
        self.worker_pids = _warm(self.settings, self.n_jobs)


def _warm(settings, n_jobs):
    """Start the pool of ``Parallel(**settings)`` and run :func:`_ready` ``n_jobs`` times on it;
    returns the workers' process ids (an empty set if that failed)."""
    try:
        return set(Parallel(**settings)(delayed(_ready)() for _ in range(n_jobs)))
    except Exception as e:  # the launcher starts its own workers and reports a real problem there
        log.debug("starting the workers early failed: %s", e)
        return set()


class StartWorkers(Callback):
    """Start the joblib workers of a multirun while the sweep is composed and validated."""

    def on_multirun_start(self, config, **kwargs):
        start(config.hydra.get("launcher"))
