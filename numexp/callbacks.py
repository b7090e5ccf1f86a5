"""Hydra callbacks, registered in ``conf/config.yaml`` under ``hydra.callbacks``."""
from hydra.experimental.callback import Callback

from numexp import sweep


class CollectRuns(Callback):
    """After a multirun: write ``runs.csv`` into the sweep folder and report the runs that failed.

    Jobs record their own failures and return normally (otherwise Hydra 1.3 would skip this
    callback), so the sweep's exit code is set here: 1 if any run failed or diverged.
    """

    def on_multirun_end(self, config, **kwargs):
        path, table = sweep.write_runs_csv(config.hydra.sweep.dir)
        if len(sweep.report(table, path)):
            raise SystemExit(1)
