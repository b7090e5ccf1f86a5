"""Command line: ``numexp [OVERRIDES]`` / ``python -m numexp [OVERRIDES]`` trains through Hydra
(``-m`` sweeps); ``numexp collect SWEEP_DIR`` rebuilds a sweep's runs.csv; ``numexp runs`` and
``numexp report`` are ``python -m numexp.runs`` and ``python -m numexp.report``; ``numexp status
SWEEP_DIR`` shows how far a sweep is (``python -m numexp.status``)."""
import os
import sys
from concurrent.futures import BrokenExecutor

import hydra
from hydra.errors import CompactHydraException
from omegaconf.errors import OmegaConfBaseException

from numexp import callbacks, config, rundir, sweep, trainer



def _runs(argv):
    from numexp import runs  # pandas/matplotlib stay out of a training run's start-up
    return runs.main(argv)


def _report(argv):
    from numexp import report
    return report.main(argv)


def _predict(argv):
    from numexp import predict
    return predict.main(argv)


def _eval(argv):
    from numexp import evaluate
    return evaluate.main(argv)


def _status(argv):
    from numexp import status
    return status.main(argv)


def _summary(argv):
    from numexp import summary
    return summary.main(argv)


COMMANDS = {"collect": sweep.main, "runs": _runs, "report": _report, "predict": _predict, "eval": _eval,
            "summary": _summary, "status": _status}


def main():
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
    config.register()
    # the task lives in an importable module: joblib's workers unpickle it by reference
    app = hydra.main(version_base="1.3", config_path="pkg://numexp.conf", config_name="config")(trainer.task)
    run_reporting_user_errors(app)


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


if __name__ == "__main__":
    main()
