"""Hydra callbacks, registered in ``conf/config.yaml`` under ``hydra.callbacks``.

Hydra turns an exception raised in a callback into a warning and carries on, so a callback
that must stop the command raises ``SystemExit``.
"""
import re
import signal
import sys

from hydra.experimental.callback import Callback

from numexp import config as numexp_config
from numexp import rundir, sweep


# the folder of the multirun this process is running (set when it starts)
active_sweep_dir = None


class CheckBeforeStart(Callback):
    """Refuse a run before Hydra creates or writes into its folder.

    Single run: the config values (:func:`numexp.config.validate`), whether the model fits the
    input shape (when known without reading the data), and the run folder: a non-empty one
    needs ``resume=true`` and must hold a run of the same config. Multirun: the sweep folder
    (a non-empty one needs ``resume=true`` and the same command); each job validates its own
    values, so one bad value fails one run, not the sweep.
    A refusal is one line on stderr and exit code 2.
    """

    def on_run_start(self, config, **kwargs):
        task = numexp_config.task_config(config)
        try:
            numexp_config.validate(task)
            numexp_config.check_model_fits(task)
            rundir.check_run_folder(config.hydra.run.dir, resume=task.resume,
                                    config_hash=numexp_config.config_hash(task),
                                    identity=numexp_config.identity(task))
        except (numexp_config.ConfigError, rundir.RunDirError) as e:
            exit_with_user_error(e)

    def on_multirun_start(self, config, **kwargs):
        global active_sweep_dir
        active_sweep_dir = config.hydra.sweep.dir
        try:
            sweep.check_sweep_folder(config)
        except rundir.RunDirError as e:
            exit_with_user_error(e)
        except Exception as e:  # fail closed: Hydra would go on and overwrite the jobs' .hydra/ folders
            exit_with_user_error(rundir.RunDirError(f"cannot check the sweep folder {config.hydra.sweep.dir} "
                                                    f"({type(e).__name__}: {e})"))


class CollectRuns(Callback):
    """After a multirun: write ``runs.csv`` into the sweep folder and report the runs that failed.

    Jobs record their own failures and return normally (otherwise Hydra 1.3 would skip this
    callback), so the sweep's exit code is set here: 1 if any run failed or diverged.
    """

    def on_multirun_end(self, config, **kwargs):
        path, table = sweep.write_runs_csv(config.hydra.sweep.dir)
        if len(sweep.report(table, path)):
            raise SystemExit(1)



def exit_with_user_error(error):
    """A mistake in the command line or the output folder: one line on stderr, exit code 2."""
    print(f"numexp: error: {numexp_config.error_line(error)}", file=sys.stderr)
    raise SystemExit(2)


def exit_after_worker_death(error):
    """A job's worker process died (SIGKILL, the out-of-memory killer, a crash) and joblib stopped the
    sweep: write runs.csv of what there is, name the runs that did not complete, exit 1 saying how
    to continue. Outside a multirun, ``error`` is raised again."""
    if active_sweep_dir is None:
        raise error
    codes = re.search(r"exit codes of the workers are \{(.*?)\}", str(error))
    exit_stopped_sweep(f"a worker process died{f' ({codes[1]})' if codes else ''}, which stops the whole sweep")


def exit_after_fail_fast(error):
    """A run failed under ``fail_fast=true`` (:class:`numexp.trainer.StopSweep`): the same ending."""
    if active_sweep_dir is None:
        raise error
    exit_stopped_sweep(f"{error}; fail_fast=true stops the sweep there")


def exit_after_interrupt(error):
    """Ctrl-C or SIGTERM (:class:`numexp.trainer.Terminated`) stopped the command; in a multirun joblib
    has already stopped the workers. Write runs.csv of what there is (a sweep), one line on how to
    go on, and exit with 128 + the signal's number, as a shell reports a process it stopped."""
    signum = getattr(error, "signum", signal.SIGINT)
    cause = str(error) or "interrupted (Ctrl-C)"
    if active_sweep_dir is None:
        print(f"numexp: error: {cause}; an interrupted run keeps its last finished epoch: run the same command "
              f"with resume=true to continue it", file=sys.stderr)
        raise SystemExit(128 + signum)
    exit_stopped_sweep(cause, code=128 + signum)


def exit_stopped_sweep(cause, code=1):
    """The sweep ended early, so Hydra skips ``on_multirun_end``: write runs.csv and the summary
    here, then one line with the cause and how to continue; exit with ``code``."""
    path, table = sweep.write_runs_csv(active_sweep_dir)
    sweep.report(table, path)
    print(f"numexp: error: {cause}; completed runs are kept: run the same command with resume=true to "
          f"continue the others", file=sys.stderr)
    raise SystemExit(code)
