"""The runs table across sweeps and days: one tidy row per run folder.

    python -m numexp.runs                              # every run under results/ -> results/runs_table.csv
    python -m numexp.runs results/multirun/2026-11-23 --experiment reg_sweep
    python -m numexp.runs --by loss.name reg           # count, mean, std, min, max of test_acc per group
    python -m numexp.runs --out -                      # CSV to stdout

A run folder is any folder holding Hydra's ``.hydra/`` (single runs, jobs of a multirun, copies
from another machine). Columns: ``run_dir``, ``experiment``, ``status``, then every config key
(``.hydra/config.yaml`` flattened to dotted names: ``model.name``, ``optim.name``, ``lr``) whose
value differs between the rows, then the summary metrics and ``error``. Runs that failed,
diverged or never finished keep their row with their status (``incomplete``: no summary.json;
``unreadable``: a damaged file, named in ``error``).

The CSV has one header line, no index column, one line per run (error messages are put on one
line), lists written as ``[32,64]`` and empty cells for missing values, so it opens unchanged
in pandas (``pd.read_csv``) and in a spreadsheet.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd
import yaml

from numexp import sweep
from numexp.rundir import METRICS, SUMMARY, atomic_write_text, read_json

DEFAULT_ROOT = "results"
# not runs.csv: that name belongs to the sweep folders (numexp.sweep)
DEFAULT_OUT = Path(DEFAULT_ROOT, "runs_table.csv")
ID_COLUMNS = ["run_dir", "experiment", "status"]
METRIC_COLUMNS = ["val_acc", "test_acc", "best_epoch", "final_val_acc", "final_test_acc", "epochs_run",
                  "stopped_early", "train_seconds", "wall_seconds"]
TAIL_COLUMNS = ["error"]
RESERVED = set(ID_COLUMNS) | set(METRIC_COLUMNS) | set(TAIL_COLUMNS)
# config keys that never change a run's result: a configuration is the other keys
NON_RESULT_KEYS = ("threads", "resume", "eval_batch_size", "data.root", "data.cache_dir", "data.use_cache", "tags",
                   "notes")
# the user's labels: shown whenever a run has them, even when every run has the same
LABEL_KEYS = ("tags", "notes")


class RunsError(Exception):
    """No runs where they were looked for, or a bad ``--by`` key; the message says which."""


# --------------------------------------------------------------------------- reading run folders

def find_run_dirs(paths):
    """Run folders (holding ``.hydra/``) at or below ``paths``, in natural path order, each once.

    A run folder's own subfolders are not searched. Paths that do not exist raise :class:`RunsError`.
    """
    found = {}
    for path in map(Path, paths):
        if not path.exists():
            raise RunsError(f"{path} does not exist: give the folder that holds the runs (default: {DEFAULT_ROOT}/)")
        if (path / ".hydra").is_dir():
            found[path.resolve()] = path
            continue
        stack = [path]
        while stack:
            folder = stack.pop()
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if (child / ".hydra").is_dir():
                    found.setdefault(child.resolve(), child)
                else:
                    stack.append(child)
    return sorted(found.values(), key=natural_key)


def natural_key(path):
    """Sort key of a path that puts job ``10`` after ``9``."""
    return [tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", part) if t)
            for part in Path(path).as_posix().split("/")]


def flatten(node, prefix=""):
    """A nested config dict as ``{"model.name": ..., "lr": ...}``; lists become ``"[32,64]"`` text."""
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, separators=(",", ":"))
        else:
            out[name] = value
    return out


def read_config(run_dir):
    """The run's composed config (``.hydra/config.yaml``), flattened; ``{}`` if the file is missing."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    return flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def experiment_name(run_dir, overrides, config):
    """The experiment a run belongs to: ``experiment`` in its config, else its ``+experiment=NAME``
    override, else Hydra's recorded choice (``.hydra/hydra.yaml``); None for a plain run."""
    if config.get("experiment"):
        return str(config["experiment"])
    if overrides.get("experiment"):
        return str(overrides["experiment"])
    hydra_yaml = Path(run_dir) / ".hydra" / "hydra.yaml"
    if hydra_yaml.exists():
        try:
            choices = yaml.safe_load(hydra_yaml.read_text(encoding="utf-8"))["hydra"]["runtime"]["choices"]
        except (yaml.YAMLError, KeyError, TypeError):
            return None
        name = choices.get("experiment")
        return None if name in (None, "null") else str(name)
    return None


def read_row(run_dir, display=None):
    """One run as a dict: id columns, ``config`` (flattened keys), metrics, error.

    Uses :func:`numexp.sweep.read_run` for the status and metrics; a run without summary.json is
    ``incomplete`` with ``epochs_run`` counted from its metrics.csv; a damaged file makes the
    row ``unreadable`` instead of stopping the scan.
    """
    run_dir = Path(run_dir)
    row = {"run_dir": display or run_dir.as_posix(), "experiment": None, "status": None,
           **dict.fromkeys(METRIC_COLUMNS), "error": None, "config": {}}
    try:
        config = read_config(run_dir)
        base = sweep.read_run(run_dir)
        summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).exists() else {}
    except (OSError, ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError is a ValueError
        row.update(status="unreadable", error=f"{type(e).__name__}: {e}")
        try:
            row["config"] = read_config(run_dir)
            row["experiment"] = experiment_name(run_dir, sweep.parse_overrides(sweep.job_overrides(run_dir)),
                                                row["config"])
        except (OSError, yaml.YAMLError, TypeError):
            row["experiment"] = experiment_name(run_dir, {}, row["config"])
        return row
    row["config"] = config
    row["experiment"] = experiment_name(run_dir, base["overrides"], config)
    row.update({k: base.get(k) for k in ("status", "error")})
    row.update({k: summary.get(k, base.get(k)) for k in METRIC_COLUMNS})
    if not summary and (run_dir / METRICS).exists():
        row["epochs_run"] = max(0, len((run_dir / METRICS).read_text(encoding="utf-8").splitlines()) - 1)
    return row


# --------------------------------------------------------------------------- the table

def gather(paths=(DEFAULT_ROOT,), relative_to=None):
    """All runs at or below ``paths`` with EVERY config key (see :func:`tidy` to drop constant ones).

    Args:
        paths: run folders, sweep folders or any folder above them.
        relative_to: write ``run_dir`` relative to this folder when the run is inside it
            (default: the current directory); otherwise the path as found.

    Returns:
        DataFrame sorted by ``run_dir``: id columns, config keys (first-seen order), metrics, error.
    """
    base = Path.cwd() if relative_to is None else Path(relative_to)
    rows = [read_row(d, _display(d, base)) for d in find_run_dirs(paths)]
    keys = {}
    for row in rows:
        keys.update(dict.fromkeys(row["config"]))
    # a config key spelt like a summary column would clash: keep it, prefixed
    rename = {k: (f"config.{k}" if k in RESERVED else k) for k in keys}
    records = [{**{c: row[c] for c in ID_COLUMNS},
                **{rename[k]: row["config"].get(k) for k in keys},
                **{c: row[c] for c in METRIC_COLUMNS + TAIL_COLUMNS}} for row in rows]
    table = pd.DataFrame(records, columns=[*ID_COLUMNS, *rename.values(), *METRIC_COLUMNS, *TAIL_COLUMNS])
    table["error"] = table["error"].map(_one_line)
    return table


def config_columns(table):
    """The config-key columns of a runs table, in order."""
    return [c for c in table.columns if c not in RESERVED]


def differing_keys(table):
    """Config keys whose values are not all equal across the rows (a missing value counts as a value)."""
    return [c for c in config_columns(table) if table[c].map(_value_key).nunique() > 1]


def tidy(table):
    """``table`` without the config keys that are the same in every row (``tags`` and ``notes`` stay
    when any run has them)."""
    keep = set(differing_keys(table))
    labelled = table[[k for k in LABEL_KEYS if k in table]].map(lambda v: _value_key(v) not in (None, "", "[]"))
    keep |= {k for k in labelled if labelled[k].any()}
    return table[[c for c in table.columns if c in RESERVED or c in keep]]


def runs_table(paths=(DEFAULT_ROOT,), experiment=None, relative_to=None):
    """The tidy runs table of ``paths`` (only ``experiment``'s runs if given)."""
    table = gather(paths, relative_to)
    if experiment is not None:
        table = table[table["experiment"] == experiment].reset_index(drop=True)
    return tidy(table)


def aggregate(table, by, metric="test_acc"):
    """Group ``table`` by the columns ``by`` and summarise ``metric`` over the completed runs.

    Returns:
        DataFrame, one row per group (sorted by the keys; missing values form their own group):
        the keys, ``n_runs`` (all runs), ``n_not_completed``, then ``<metric>_count``, ``_mean``,
        ``_std`` (sample, ddof=1; empty for one run), ``_min``, ``_max`` over the completed runs.
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = [k for k in by if k not in table.columns]
    if missing:
        raise RunsError(f"--by {missing[0]}: no such column; columns are {', '.join(table.columns)}")
    rows = []
    keys = table[by].apply(lambda row: tuple(_value_key(v) for v in row), axis=1) if len(table) else []
    for key in sorted(set(keys), key=lambda k: tuple(_sort_key(v) for v in k)):
        group = table[[k == key for k in keys]]
        done = group[group["status"] == "completed"]
        values = pd.to_numeric(done[metric], errors="coerce").dropna()
        rows.append({**{k: group[k].iloc[0] for k in by}, "n_runs": len(group),
                     "n_not_completed": len(group) - len(done), f"{metric}_count": len(values),
                     f"{metric}_mean": values.mean() if len(values) else math.nan,
                     f"{metric}_std": values.std(ddof=1) if len(values) > 1 else math.nan,
                     f"{metric}_min": values.min() if len(values) else math.nan,
                     f"{metric}_max": values.max() if len(values) else math.nan})
    columns = [*by, "n_runs", "n_not_completed",
               *(f"{metric}_{s}" for s in ("count", "mean", "std", "min", "max"))]
    return pd.DataFrame(rows, columns=columns)


def to_csv(table):
    """CSV text: one header line, no index, full float precision, ``\\n`` line ends."""
    return table.to_csv(index=False, lineterminator="\n")


# --------------------------------------------------------------------------- command line

def main(argv=None):
    """``python -m numexp.runs``; exit code 0, 1 when no run is found, 2 for a usage error."""
    parser = argparse.ArgumentParser(
        prog="python -m numexp.runs",
        description="One row per run folder: run_dir, experiment, status, the config keys that differ, "
                    "the summary metrics. Failed and unfinished runs keep their row.")
    parser.add_argument("paths", nargs="*", default=[DEFAULT_ROOT], metavar="PATH",
                        help="run, sweep or parent folders (default: results/)")
    parser.add_argument("--by", nargs="+", metavar="KEY",
                        help="group by these columns: count, mean, std, min, max of test_acc per group")
    parser.add_argument("--experiment", metavar="NAME", help="only the runs of this experiment")
    parser.add_argument("--metric", default="test_acc", help="the column --by summarises (default test_acc)")
    parser.add_argument("--all-keys", action="store_true", help="keep config keys that are the same in every run")
    parser.add_argument("--out", metavar="FILE",
                        help=f"output CSV (default: {DEFAULT_OUT.as_posix()}, with --by "
                             f"{DEFAULT_ROOT}/runs_by_KEY.csv; '-' = stdout)")
    args = parser.parse_args(argv)
    try:
        table = gather(args.paths)
        if args.experiment is not None:
            table = table[table["experiment"] == args.experiment].reset_index(drop=True)
        if not len(table):
            where = ", ".join(args.paths) + (f" for experiment {args.experiment}" if args.experiment else "")
            print(f"no run folders (folders holding .hydra/) under {where}", file=sys.stderr)
            return 1
        shown = table if args.all_keys else tidy(table)
        result = aggregate(table, args.by, args.metric) if args.by else shown
    except RunsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = to_csv(result)
    out = args.out or _default_out(args.by)
    if out == "-":
        sys.stdout.write(text)
        return 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    counts = table["status"].value_counts()
    others = ", ".join(f"{counts[s]} {s}" for s in sorted(counts.index) if s != "completed")
    print(f"{len(table)} runs: {counts.get('completed', 0)} completed{', ' + others if others else ''} -> {out}")
    view = result if args.by else shown.drop(columns=["error"] + [c for c in METRIC_COLUMNS
                                                                   if c not in ("val_acc", "test_acc")])
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 60):
        print(view.to_string(index=False))
    return 0


def _default_out(by):
    if not by:
        return str(DEFAULT_OUT)
    return str(Path(DEFAULT_ROOT, "runs_by_" + "_".join(re.sub(r"[^\w.-]", "_", k) for k in by) + ".csv"))


def _display(run_dir, base):
    try:
        return run_dir.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return run_dir.as_posix()


def _one_line(message):
    if message is None or (isinstance(message, float) and math.isnan(message)):
        return None
    return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _value_key(value):
    """A hashable, comparable stand-in for a cell: missing values are one value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _sort_key(value):
    if value is None:
        return (2, 0, "")
    if isinstance(value, bool):
        return (1, 0, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0, str(value))


if __name__ == "__main__":
    sys.exit(main())
