"""Command line: ``numexp [OVERRIDES]`` / ``python -m numexp [OVERRIDES]`` trains through Hydra
(``-m`` sweeps); ``numexp collect SWEEP_DIR`` rebuilds a sweep's runs.csv; ``numexp VERB ...`` for
VERB in runs, report, predict, eval, summary, status, plan is ``python -m numexp.VERB ...``."""
import importlib
import os
import signal
import sys
from concurrent.futures import BrokenExecutor

import hydra
from hydra.errors import CompactHydraException
from omegaconf.errors import OmegaConfBaseException

from numexp import callbacks, config, rundir, sweep, trainer

# subcommand -> module with main(argv); imported only when used, so pandas/matplotlib stay out of a
# training run's start-up
SUBCOMMANDS = {"runs": "runs", "report": "report", "predict": "predict", "eval": "evaluate",
               "summary": "summary", "status": "status", "plan": "plan"}


def _subcommand(module):
    def run(argv):
        return importlib.import_module(f"numexp.{module}").main(argv)
    return run


COMMANDS = {"collect": sweep.main, **{name: _subcommand(module) for name, module in SUBCOMMANDS.items()}}


def main():
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
    if "+plan=true" in sys.argv[1:]:  # `numexp -m ... +plan=true` is `numexp plan ...`
        sys.exit(COMMANDS["plan"](sys.argv[1:]))
    config.register()
    stop_on_sigterm()
    # the task lives in an importable module: joblib's workers unpickle it by reference
    app = hydra.main(version_base="1.3", config_path="pkg://numexp.conf", config_name="config")(trainer.task)
    run_reporting_user_errors(app)


def stop_on_sigterm():
    """Make SIGTERM (``kill``, ``timeout``, a scheduler stopping the job) end this process as Ctrl-C does.

    By default it ends this process alone: a run would leave no summary, and a sweep's joblib workers
    would go on with their runs and then sit idle, the other runs never started and no runs.csv. As
    an interrupt, the run records itself as interrupted (its last epoch's state kept for
    ``resume=true``), and a sweep's joblib stops its workers before runs.csv is written."""
    def interrupt(signum, frame):
        raise trainer.Terminated(signum)
    signal.signal(signal.SIGTERM, interrupt)


# a bad command line or output folder: one line on stderr, exit code 2, no traceback
USER_ERRORS = (CompactHydraException, OmegaConfBaseException, config.ConfigError, rundir.RunDirError)


def run_reporting_user_errors(app):
    """Run the Hydra app; print a user error (composition, value, folder) as one line and exit 2.

    Hydra prints its own composition errors over several lines, unless HYDRA_FULL_ERROR=1 makes it
    re-raise them; that is set here so they reach this function. A user who set HYDRA_FULL_ERROR=1
    gets the full traceback, as Hydra promises.
    """
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except USER_ERRORS as e:
        if wants_traceback:
            raise
        callbacks.exit_with_user_error(e)
    except BrokenExecutor as e:  # a multirun's worker process died
        callbacks.exit_after_worker_death(e)
    except trainer.StopSweep as e:  # a run failed under fail_fast=true
        callbacks.exit_after_fail_fast(e)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (stop_on_sigterm)
        callbacks.exit_after_interrupt(e)


if __name__ == "__main__":
    main()
