"""Command line: ``numexp [OVERRIDES]`` / ``python -m numexp [OVERRIDES]`` trains through Hydra
(``-m`` sweeps); ``numexp collect SWEEP_DIR`` rebuilds a sweep's runs.csv; ``numexp runs`` and
``numexp report`` are ``python -m numexp.runs`` and ``python -m numexp.report``."""
import sys

import hydra

from numexp import config, sweep, trainer



def _runs(argv):
    from numexp import runs  # pandas/matplotlib stay out of a training run's start-up
    return runs.main(argv)


def _report(argv):
    from numexp import report
    return report.main(argv)


COMMANDS = {"collect": sweep.main, "runs": _runs, "report": _report}


def main():
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
    config.register()
    # the task lives in an importable module: joblib's workers unpickle it by reference
    app = hydra.main(version_base="1.3", config_path="pkg://numexp.conf", config_name="config")(trainer.task)
    app()


if __name__ == "__main__":
    main()
