"""``numexp status SWEEP_DIR``: where a sweep stands, from its run folders only.

    python -m numexp.status results/multirun/2026-11-23/10-00-00-000000

One line per run (state, epoch of epochs, best val_acc, seconds per epoch, host, pid, its swept
keys), then ``N runs: done / running / failed / pending; best so far; estimated time left``.
It only reads files (each run's ``status.json``, else its ``summary.json``; the sweep's
``multirun.yaml`` for the number of jobs not started yet), so it works while the sweep runs, after
a crash and on folders copied back from a cluster. A run recorded as running on this host whose
process is gone is shown as ``killed``.
"""
import math
import os
import socket
import sys
from pathlib import Path

import yaml

from numexp import sweep
from numexp.rundir import STATUS, SUMMARY, read_json

FAILED = ("failed", "diverged", "interrupted", "killed")


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def run_state(run_dir):
    """``{"state", "epoch", "epochs", "best_val_acc", "seconds_per_epoch", "host", "pid"}`` of one run."""
    run_dir = Path(run_dir)
    out = dict.fromkeys(["epoch", "epochs", "best_val_acc", "seconds_per_epoch", "host", "pid"])
    try:
        if (run_dir / STATUS).exists():
            out.update(read_json(run_dir / STATUS))
        elif (run_dir / SUMMARY).exists():  # a run from before status.json existed
            summary = read_json(run_dir / SUMMARY)
            out.update(state=summary.get("status"), epoch=summary.get("epochs_run"),
                       best_val_acc=summary.get("val_acc"))
        else:
            out["state"] = "pending"  # Hydra made the folder; the run has not written anything yet
    except (OSError, ValueError) as e:
        out["state"] = f"unreadable ({type(e).__name__})"
    # a process on another machine cannot be checked from here
    if out["state"] == "running" and out["host"] == socket.gethostname() and out["pid"] \
            and not process_alive(int(out["pid"])):
        out["state"] = "killed"
    return out


def planned_jobs(sweep_dir):
    """The number of jobs of a basic-sweeper grid, from the sweep's ``multirun.yaml``; None if unknown."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        hydra = yaml.safe_load((Path(sweep_dir) / sweep.MULTIRUN_YAML).read_text(encoding="utf-8"))["hydra"]
        if not hydra["sweeper"]["_target_"].endswith("BasicSweeper"):
            return None  # e.g. optuna: the number of trials is not a grid
        params = [f"{k}={v}" for k, v in (hydra["sweeper"].get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides(params + list(hydra["overrides"]["task"]))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # noqa: BLE001 - no or unusual multirun.yaml: count only the folders there are
        return None


def sweep_status(sweep_dir):
    """``(rows, line)``: one dict per run (job, state, ..., overrides) and the summary line."""
    sweep_dir = Path(sweep_dir)
    dirs = [sweep_dir] if (sweep_dir / ".hydra").is_dir() else sweep.run_dirs(sweep_dir)
    rows = []
    for run_dir in dirs:
        # a job Hydra is still setting up may have no overrides.yaml yet: job_overrides copes
        rows.append({"job": run_dir.name, **run_state(run_dir),
                     "overrides": sweep.parse_overrides(sweep.job_overrides(run_dir))})
    planned = planned_jobs(sweep_dir)
    not_started = max(0, planned - len(rows)) if planned is not None else 0
    return rows, summary_line(rows, not_started)


def summary_line(rows, not_started=0):
    count = {s: sum(r["state"] == s for r in rows) for s in ("completed", "running", "pending")}
    failed = sum(r["state"] in FAILED for r in rows)
    pending = count["pending"] + not_started
    parts = [f"{len(rows) + not_started} runs: {count['completed']} done, {count['running']} running, "
             f"{failed} failed, {pending} pending"]
    scored = [r for r in rows if r["best_val_acc"] is not None]
    if scored:
        best = max(scored, key=lambda r: r["best_val_acc"])
        parts.append(f"best val_acc {best['best_val_acc']:.4f} (job {best['job']})")
    parts.append(f"time left {time_left(rows, pending)}")
    return "; ".join(parts)


def time_left(rows, pending):
    """Seconds per epoch x epochs still to train (pending runs: the mean of the known ones), divided by
    the runs going at once; ``unknown`` before any epoch is timed or when nothing is running."""
    running = [r for r in rows if r["state"] == "running"]
    if not running and not pending:
        return "none"
    timed = [r for r in rows if r["seconds_per_epoch"] and r["epochs"]]
    if not running or not timed:
        return "unknown"
    mean_spe = sum(r["seconds_per_epoch"] for r in timed) / len(timed)
    mean_epochs = sum(r["epochs"] for r in timed) / len(timed)
    work = sum((r["seconds_per_epoch"] or mean_spe) * ((r["epochs"] or mean_epochs) - (r["epoch"] or 0))
               for r in running)
    work += pending * mean_spe * mean_epochs
    return "about " + duration(work / len(running))


def duration(seconds):
    seconds = int(math.ceil(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def table_text(rows):
    """The runs as aligned text columns; only the override keys that differ between runs."""
    keys = {k: None for r in rows for k in r["overrides"]}
    varying = [k for k in keys if len({str(r["overrides"].get(k)) for r in rows}) > 1] or list(keys)
    header = ["job", "state", "epoch", "best_val", "s/epoch", "host", "pid", "overrides"]
    lines = [header]
    for r in rows:
        epoch = f"{r['epoch'] or 0}/{r['epochs']}" if r["epochs"] else str(r["epoch"] or "")
        lines.append([r["job"], r["state"], epoch, _num(r["best_val_acc"], ".4f"), _num(r["seconds_per_epoch"], ".2f"),
                      r["host"] or "", str(r["pid"] or ""),
                      " ".join(f"{k}={r['overrides'][k]}" for k in varying if k in r["overrides"])])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _num(value, spec):
    return "" if value is None else format(value, spec)


def main(argv=None):
    """Print the table and the summary line; exit code 0, 2 for a usage error."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: numexp status SWEEP_DIR  (a multirun folder, or one run's folder)", file=sys.stderr)
        return 2
    rows, line = sweep_status(argv[0])
    if rows:
        print(table_text(rows))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
