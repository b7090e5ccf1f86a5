"""The runs table of a sweep: one row per run folder, the swept keys, then the summary metrics.

``collect(sweep_dir)`` only reads run folders (``<sweep_dir>/<job>/.hydra/overrides.yaml`` and
``summary.json``), so it is safe to re-run at any time: ``numexp collect SWEEP_DIR`` rebuilds
``runs.csv`` for a sweep that crashed, is still running, or was copied back from elsewhere.
After a multirun, :class:`numexp.callbacks.CollectRuns` calls it.
"""
import logging
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from numexp import config
from numexp.rundir import SUMMARY, RunDirError, atomic_write_text, first_difference, read_json

log = logging.getLogger(__name__)

RUNS_CSV = "runs.csv"
MULTIRUN_YAML = "multirun.yaml"  # Hydra's record of the sweep's composed config and command
SUMMARY_COLUMNS = ["val_acc", "test_acc", "best_epoch", "final_test_acc", "epochs_run", "train_seconds",
                   "status", "error"]
# the end-of-sweep table: how many runs, which metrics
BEST_SHOWN = 10
BEST_COLUMNS = ["val_acc", "test_acc", "best_epoch", "epochs_run", "train_seconds"]


def run_dirs(sweep_dir):
    """Run folders of a sweep (those holding Hydra's ``.hydra/``), in job order."""
    found = [p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()]
    return sorted(found, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def parse_overrides(overrides):
    """``["reg=1e-05", "+experiment=reg_sweep"]`` -> ``{"reg": "1e-05", "experiment": "reg_sweep"}``.

    Keys that only control execution (``resume``) are left out: they are not runs-table columns.
    """
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if sep and key not in config.NOT_IDENTITY:
            out[key] = value
    return out


def job_overrides(run_dir):
    """The job's override list from ``.hydra/overrides.yaml``; for a job whose worker was stopped while
    Hydra was still writing its files (fail_fast, a killed worker), the copy in ``.hydra/hydra.yaml``;
    [] when neither is there."""
    hydra_dir = Path(run_dir) / ".hydra"
    try:
        return yaml.safe_load((hydra_dir / "overrides.yaml").read_text(encoding="utf-8")) or []
    except FileNotFoundError:
        pass
    try:
        return list(yaml.safe_load((hydra_dir / "hydra.yaml").read_text(encoding="utf-8"))["hydra"]["overrides"]["task"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []


def read_run(run_dir):
    """One row: the run's overrides and its summary metrics (status ``incomplete`` without a summary)."""
    run_dir = Path(run_dir)
    overrides = job_overrides(run_dir)
    summary_path = run_dir / SUMMARY
    if summary_path.exists():
        summary = read_json(summary_path)
    else:
        summary = {"status": "incomplete", "error": "no summary.json: still running, or killed"}
    return {"overrides": parse_overrides(overrides), **{k: summary.get(k) for k in SUMMARY_COLUMNS}}


def collect(sweep_dir):
    """The runs table of ``sweep_dir``: job, the overridden keys (those that vary first), metrics,
    status, error, run_dir (relative to ``sweep_dir``)."""
    rows, keys = [], {}
    for run_dir in run_dirs(sweep_dir):
        row = read_run(run_dir)
        keys.update(dict.fromkeys(row["overrides"]))
        rows.append({"job": run_dir.name, **row.pop("overrides"), **row, "run_dir": run_dir.name})
    import pandas as pd  # here, not at the top: a training run's start-up does without pandas

    table = pd.DataFrame(rows, columns=["job", *keys, *SUMMARY_COLUMNS, "run_dir"])
    for column in ["job", *keys]:
        table[column] = _numeric_if_possible(table[column])
    # keys that vary across runs first: they are what the sweep compares
    varying = [k for k in keys if table[k].nunique(dropna=False) > 1]
    fixed = [k for k in keys if k not in varying]
    return table[["job", *varying, *fixed, *SUMMARY_COLUMNS, "run_dir"]]


def write_runs_csv(sweep_dir):
    """Collect ``sweep_dir`` into ``<sweep_dir>/runs.csv`` (atomically); returns (path, table)."""
    table = collect(sweep_dir)
    path = Path(sweep_dir) / RUNS_CSV
    atomic_write_text(path, table.to_csv(index=False))
    return path, table


def report(table, path, top=BEST_SHOWN):
    """Log the sweep's outcome: counts, the best runs as a table (swept keys as columns), each run
    that did not complete with its reason, and where ``runs.csv`` is.

    Returns:
        the rows of runs that did not complete.
    """
    bad = table[table["status"] != "completed"]
    log.info("%d runs: %d completed, %d failed, diverged or incomplete", len(table), len(table) - len(bad), len(bad))
    best = best_runs(table, top)
    if len(best):
        shown = f"the best {len(best)}" if len(best) < len(table) - len(bad) else "completed runs"
        log.info("%s by val_acc:\n%s", shown, best.to_string(index=False, float_format="{:g}".format))
    for _, row in bad.iterrows():
        log.error("job %s (%s) %s: %s", row["job"], _describe(row, table), row["status"], row["error"])
    log.info("runs table: %s", path)
    return bad


def best_runs(table, top=BEST_SHOWN):
    """The ``top`` completed runs by val_acc: job, the keys that vary across the sweep, the metrics,
    formatted for the terminal."""
    done = table[table["status"] == "completed"].dropna(subset=["val_acc"])
    done = done.sort_values(["val_acc", "test_acc"], ascending=False, kind="stable").head(top)
    columns = ["job", *swept_keys(table), *BEST_COLUMNS]
    shown = done[columns].copy()
    for metric in ("val_acc", "test_acc"):
        shown[metric] = shown[metric].map("{:.4f}".format)
    shown["train_seconds"] = shown["train_seconds"].map("{:.0f}".format)
    return shown


def override_keys(table):
    """The runs table's override columns (everything but job, run_dir and the summary columns)."""
    return [c for c in table.columns if c not in ("job", "run_dir", *SUMMARY_COLUMNS)]


def swept_keys(table):
    """Override keys whose value differs between the sweep's runs."""
    return [k for k in override_keys(table) if table[k].nunique(dropna=False) > 1]


def check_sweep_folder(cfg):
    """Before a multirun writes into ``hydra.sweep.dir``: may it use that folder?

    A missing or empty folder (or one holding only ``multirun.yaml``) is fine. Any other needs
    ``resume=true`` and must come from the same command (the overrides, the grid and the
    composed config in its ``multirun.yaml`` equal this one's, ``resume`` aside): then every job
    lands in its earlier folder, where a completed run is skipped and an unfinished one
    continues from its checkpoint.

    Raises:
        RunDirError: the message names the folder, the first difference and what to do.
    """
    sweep_dir = Path(cfg.hydra.sweep.dir)
    # only Hydra's multirun.yaml: a sweep whose composition failed, or killed before its first job
    if not sweep_dir.is_dir() or not any(p.name != MULTIRUN_YAML for p in sweep_dir.iterdir()):
        return
    if not cfg.get("resume", False):
        raise RunDirError(f"sweep folder {sweep_dir} is not empty: add resume=true to continue that sweep "
                          f"(completed runs are skipped), or choose another folder (hydra.sweep.dir=...)")
    saved = sweep_dir / MULTIRUN_YAML
    if not saved.is_file():
        raise RunDirError(f"sweep folder {sweep_dir} holds no {MULTIRUN_YAML}: it is not a numexp sweep, "
                          f"there is nothing to resume; choose another folder")
    difference = first_difference(_sweep_identity(OmegaConf.load(saved)), _sweep_identity(cfg))
    if difference:
        raise RunDirError(f"sweep folder {sweep_dir} was started by another command ({difference}): "
                          f"resume=true needs the same overrides and config; choose another folder")


def _sweep_identity(cfg):
    """What fixes a sweep's jobs and their numbering: overrides (in order), grid, subdir, base config."""
    overrides = [o for o in cfg.hydra.overrides.task if o.partition("=")[0].lstrip("+~") not in config.NOT_IDENTITY]
    base = OmegaConf.to_container(config.task_config(cfg), resolve=False, enum_to_str=True)
    for key in config.NOT_IDENTITY:
        base.pop(key, None)
    params = cfg.hydra.sweeper.get("params")
    return {"overrides": list(overrides),
            "hydra.sweeper.params": None if params is None else OmegaConf.to_container(params),
            # unresolved: it interpolates ${hydra.job.num}, which only a job has
            "hydra.sweep.subdir": OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"],
            **base}


def main(argv):
    """``numexp collect SWEEP_DIR``: rebuild runs.csv, print it; exit code 1 if a run did not complete."""
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: numexp collect SWEEP_DIR  (a multirun folder holding one folder per run)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, table = write_runs_csv(argv[0])
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(table.drop(columns=["error", "run_dir"]).to_string(index=False))
    return 1 if len(report(table, path)) else 0


def _describe(row, table):
    """The run's overrides as ``key=value`` text."""
    import pandas as pd

    return " ".join(f"{k}={row[k]}" for k in override_keys(table) if not pd.isna(row[k]))


def _numeric_if_possible(column):
    try:
        import pandas as pd

        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column
