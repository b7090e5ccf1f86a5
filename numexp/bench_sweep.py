"""The sweep benchmark: one multirun of equal runs with two at a time against the same runs one
after another, each run on one BLAS thread (``python -m numexp.bench --sweep``).

Each round times the whole command (``python -m numexp -m ...``: start-up, the runs, runs.csv)
for ``hydra.launcher.n_jobs=1`` and ``=2`` in turn, in fresh sweep folders, and reads every
run's own ``wall_seconds`` from its summary.json, so the ratio splits into what the runs lost
to each other (they share the memory bus and the L3 cache) and what the sweep adds around them
(``overhead_s``: start-up, composing and validating every job's config, starting the workers,
runs.csv; about 1.5 s on this 2-core machine).
The default runs are SimpleConvNet on MNIST for 10 epochs (7.5-9 s each) when ``$NUMEXP_DATA_ROOT``
holds MNIST, else on the embedded digits for 100 epochs; ``--sweep-args`` replaces them. Runs of a
few seconds measure mostly that overhead: with 3 epochs (2.6 s a run) the same sweep took 0.58-0.61x.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUN_ARGS = ["model=simple_convnet", "optim=sgd", "lr=0.01", "schedule=fixed", "threads=1", "seed=0,1,2,3"]


def default_args():
    """The runs timed by default: MNIST when it is on disk, the embedded digits otherwise."""
    mnist = Path(os.environ.get("NUMEXP_DATA_ROOT", "data")) / "MNIST"
    data = ["data=mnist", "epochs=10"] if mnist.is_dir() and any(mnist.iterdir()) else ["data=digits", "epochs=100"]
    return RUN_ARGS + data


def time_sweep(args, n_jobs, folder):
    """Wall seconds of ``python -m numexp -m ARGS`` with ``n_jobs`` runs at a time, and the sum of
    its runs' own wall seconds (summary.json)."""
    command = [sys.executable, "-m", "numexp", "-m", *args, f"hydra.launcher.n_jobs={n_jobs}",
               f"hydra.sweep.dir={folder}"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"the sweep failed (exit {done.returncode}): {' '.join(command)}\n{tail}")
    summaries = [json.loads(p.read_text()) for p in Path(folder).glob("*/summary.json")]
    return wall, sum(s["wall_seconds"] for s in summaries), len(summaries)


def bench_sweep(args, rounds, pause=1.0):
    """One row per (round, n_jobs) and a summary row per n_jobs (medians), each with the ratio of its
    wall time to the median one-at-a-time wall time."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="numexp-bench-sweep-") as tmp:
        for round_ in range(rounds):
            for n_jobs in (1, 2) if round_ % 2 == 0 else (2, 1):  # alternate which goes first
                time.sleep(pause)
                wall, runs, count = time_sweep(args, n_jobs, Path(tmp) / f"r{round_}-j{n_jobs}")
                rows.append(dict(round=round_, n_jobs=n_jobs, runs=count, wall_s=wall, run_wall_sum_s=runs))
    sequential = np.median([r["wall_s"] for r in rows if r["n_jobs"] == 1])
    for n_jobs in (1, 2):
        mine = [r for r in rows if r["n_jobs"] == n_jobs]
        rows.append(dict(round="median", n_jobs=n_jobs, runs=mine[0]["runs"],
                         wall_s=float(np.median([r["wall_s"] for r in mine])),
                         run_wall_sum_s=float(np.median([r["run_wall_sum_s"] for r in mine]))))
    for r in rows:
        r["vs_one_at_a_time"] = r["wall_s"] / sequential
        r["overhead_s"] = r["wall_s"] - r["run_wall_sum_s"] / r["n_jobs"]
    return rows


SWEEP_COLUMNS = ["round", "n_jobs", "runs", "wall_s", "run_wall_sum_s", "overhead_s", "vs_one_at_a_time", "args"]


def print_sweep(rows, args):
    print(f"sweep: python -m numexp -m {' '.join(args)} (n_jobs=1, then 2; 1 BLAS thread per run)")
    print(" ".join(f"{c:>16}" for c in SWEEP_COLUMNS[:-1]))
    for r in rows:
        print(" ".join(f"{r[c]:>16.2f}" if isinstance(r[c], float) else f"{str(r[c]):>16}" for c in SWEEP_COLUMNS[:-1]))
    median = {r["n_jobs"]: r for r in rows if r["round"] == "median"}
    one, two = median[1], median[2]
    print(f"two at a time: {two['vs_one_at_a_time']:.2f}x the wall time of one at a time; the runs themselves "
          f"took {two['run_wall_sum_s'] / one['run_wall_sum_s']:.2f}x as long side by side; the sweep's own time "
          f"around them: {one['overhead_s']:.2f} s one at a time, {two['overhead_s']:.2f} s two at a time")
