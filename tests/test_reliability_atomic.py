"""Every file the harness writes is replaced atomically: killed at any moment, a writer leaves the
old or the new file, never a torn one; a failing rename leaves the old file and no temporary.

Files: metrics.csv, summary.json, confusion.csv and runs.csv (``rundir.atomic_write_text``),
checkpoint.npz (``nn.save_npz``), last.npz (``RunDir.save_state``), the data cache (``cache.save_cache``).
"""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

from numexp import nn, rundir
from numexp.data import cache

# Rewrites every file again and again; version i of each file is self-describing, so a reader
# can tell a complete version from a torn one. Prints "ready" once every file exists.
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from numexp import nn, rundir
    from numexp.data import cache

    folder = Path(sys.argv[1])
    run = rundir.RunDir(folder)
    meta = cache.cache_meta("test", version_of_test=1)
    i = 0
    while True:
        i += 1
        n = 100_000 + 1000 * (i % 50)  # sizes change, so a torn file cannot look complete
        rows = [{"epoch": e, "lr": 0.5 * e, "train_loss": float(i), "train_acc": 0.25, "val_acc": 0.5,
                 "test_acc": 0.75, "seconds": 1.0} for e in range(1, 200 + i % 50)]
        run.metrics = rows
        run.write_metrics()
        run.write_summary({"i": i, "pad": "x" * n})
        run.save_checkpoint({"w": np.full(n, i, np.float32)})
        run.save_state({"w": np.full(n, i, np.float32)}, {"i": i, "n": n})
        run.save_confusion(np.full((10, 10), i))
        cache.save_cache(folder / "cache.npz", meta, {"x": np.full(n, i, np.uint8)})
        if i == 1:
            print("ready", flush=True)
""")

NAIVE_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    path = Path(sys.argv[1]) / "summary.json"
    i = 0
    while True:
        i += 1
        with open(path, "w") as f:  # no temporary file: what the harness must not do
            f.write('{"i": %d, "pad": "%s"}' % (i, "x" * 2_000_000))
        if i == 1:
            print("ready", flush=True)
""")


def kill_at_random(script, folder, rng):
    """Start ``script`` on ``folder``, let it run a random 0-150 ms past its first round, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0, 0.15))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def check_complete(folder):
    """Every file parses and is internally consistent (one whole version)."""
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["seconds"] == "1.0" for r in rows)  # the last column of the last row is whole
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["pad"]) == 100_000 + 1000 * (summary["i"] % 50)
    w = nn.load_npz(folder / "checkpoint.npz")["w"]
    assert np.all(w == w[0]) and len(w) == 100_000 + 1000 * (int(w[0]) % 50)
    arrays, meta = rundir.RunDir(folder).load_state()
    assert len(arrays["w"]) == meta["n"] and np.all(arrays["w"] == meta["i"])
    confusion = np.loadtxt(folder / "confusion.csv", delimiter=",", skiprows=1, dtype=np.int64)
    assert confusion.shape == (10, 11) and np.all(confusion[:, 1:] == confusion[0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # load_cache warns about (and refuses) a torn cache
        arrays = cache.load_cache(folder / "cache.npz", cache.cache_meta("test", version_of_test=1), lambda a: None)
    assert arrays is not None and np.all(arrays["x"] == arrays["x"][0])


def test_writers_killed_at_random_moments_leave_whole_files(tmp_path):
    rng = random.Random(5)
    left_temp_files = 0
    for trial in range(12):
        folder = tmp_path / str(trial)
        kill_at_random(WRITER, folder, rng)
        check_complete(folder)
        left_temp_files += sum(rundir.is_temp_file(p.name) or p.name.endswith(".tmp") for p in folder.iterdir())
    # the kills did land in the middle of writes (their temporary files are left behind), not only between
    assert left_temp_files > 0


def test_the_same_kills_do_tear_a_naive_writer(tmp_path):
    """The check above has teeth: without temp file + rename, a kill leaves a torn file."""
    rng = random.Random(0)
    torn = 0
    for trial in range(6):
        folder = tmp_path / str(trial)
        folder.mkdir()
        kill_at_random(NAIVE_WRITER, folder, rng)
        try:
            json.loads((folder / "summary.json").read_text())
        except ValueError:
            torn += 1
    assert torn > 0


@pytest.mark.parametrize("writer", ["metrics", "summary", "confusion", "runs.csv", "checkpoint", "last"])
def test_a_failing_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, writer):
    run = rundir.RunDir(tmp_path)
    write = {
        "metrics": lambda v: (setattr(run, "metrics", [{"epoch": v}]), run.write_metrics()),
        "summary": lambda v: run.write_summary({"i": v}),
        "confusion": lambda v: run.save_confusion(np.full((2, 2), v)),
        "runs.csv": lambda v: rundir.atomic_write_text(tmp_path / "runs.csv", f"job\n{v}\n"),
        "checkpoint": lambda v: run.save_checkpoint({"w": np.full(3, v)}),
        "last": lambda v: run.save_state({"w": np.full(3, v)}, {"i": v}),
    }[writer]
    write(1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(os, "replace", _raise_enospc)
    with pytest.raises(OSError, match="No space left"):
        write(2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_failing_rename_of_the_cache_warns_and_keeps_the_old_cache(tmp_path, monkeypatch):
    path, meta = tmp_path / "c.npz", cache.cache_meta("test")
    assert cache.save_cache(path, meta, {"x": np.zeros(3)})
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", _raise_enospc)
    with pytest.warns(UserWarning, match="could not write cache"):
        assert not cache.save_cache(path, meta, {"x": np.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"] and path.read_bytes() == before


def _raise_enospc(src, dst):
    raise OSError(28, "No space left on device")


def test_threads_of_one_process_write_through_their_own_temporaries(tmp_path):
    """Two threads writing one path at once (two loaders building one cache) must not interleave
    their bytes in a shared temporary: each whole version lands, the last one wins."""
    from numexp.atomic import atomic_open
    path = tmp_path / "cache.npz"
    started, names, errors = threading.Barrier(2), [None, None], []

    def write(i):
        try:
            with atomic_open(path) as f:
                names[i] = os.path.basename(f.name)
                started.wait(timeout=10)  # both temporaries are open at once
                np.savez(f, x=np.full(100_000, i, np.int32))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and names[0] != names[1]
    with np.load(path, allow_pickle=False) as z:
        assert len(set(z["x"].tolist())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]
