"""Two processes building the same data-set cache at once (two jobs of a sweep starting together on
one host) end with one valid cache that both, and every later load, agree on."""
import json
import os
import subprocess
import sys
import time

import numpy as np

from numexp import data
from test_data import make_gtsrb

# One builder: announce it is ready, wait for the go file, load (which builds the cache), save what
# it loaded. Run as a separate interpreter, as a job of a sweep would be.
BUILDER = """
import json, os, sys, time
from pathlib import Path
import numpy as np
from numexp import data

root, cache_dir, sync, out = map(Path, sys.argv[1:5])
(sync / f"ready-{os.getpid()}").touch()
deadline = time.monotonic() + 60
while not (sync / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no go file within 60 s")
    time.sleep(0.001)
start = time.time()
ds = data.load("gtsrb", root=root, cache_dir=cache_dir, size=16)
end = time.time()
np.savez(out.with_suffix(".npz"), x_train=ds.x_train, y_train=ds.y_train, x_val=ds.x_val, y_val=ds.y_val,
         x_test=ds.x_test, y_test=ds.y_test, mean=ds.mean, std=ds.std)
out.with_suffix(".json").write_text(json.dumps({"hit": ds.info["cache_hit"], "cache": ds.info["cache"],
                                                "start": start, "end": end}))
(sync / f"done-{os.getpid()}").touch()
"""
# A reader polling the cache folder while the builders write: every *.npz it ever sees must be a
# complete archive (writers write a temporary name and rename it into place).
READER = """
import sys, time, zipfile
from pathlib import Path
import numpy as np

cache_dir, sync, out = map(Path, sys.argv[1:4])
(sync / "ready-reader").touch()
while not (sync / "go").exists():
    time.sleep(0.001)
reads, torn = 0, []
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    finished = len(list(sync.glob("done-*"))) == 2
    for path in cache_dir.glob("*.npz") if cache_dir.exists() else []:
        try:
            with np.load(path, allow_pickle=False) as npz:
                for key in npz.files:
                    npz[key]
            reads += 1
        except Exception as e:  # noqa: BLE001
            torn.append(f"{type(e).__name__}: {e}")
    if finished:
        break
out.write_text(f"{reads} {len(torn)} {torn[:3]}")
"""
ARRAYS = ["x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "mean", "std"]


def test_two_processes_building_one_cache_at_once_leave_one_valid_cache(tmp_path):
    # ~300 images: decoding takes long enough that both builders find no cache and build it
    root = make_gtsrb(tmp_path / "data", classes=5, tracks=5, frames=10, test_per_class=10)
    cache_dir, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NUMEXP_CACHE_DIR"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(root), str(cache_dir), str(sync),
                               str(tmp_path / f"out{i}")], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    procs.append(subprocess.Popen([sys.executable, "-c", READER, str(cache_dir), str(sync), str(tmp_path / "reader")],
                                  env=env, stderr=subprocess.PIPE, text=True))
    try:
        # the barrier: both interpreters are up with numexp imported, then both start at once
        deadline = time.monotonic() + 120
        while len(list(sync.glob("ready-*"))) < 3:
            assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
            assert time.monotonic() < deadline, "the builders did not start within 120 s"
            time.sleep(0.01)
        (sync / "go").touch()
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert "unusable cache" not in err and "could not write cache" not in err, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    reads, torn, examples = (tmp_path / "reader").read_text().split(" ", 2)
    assert int(torn) == 0, f"a reader saw {torn} incomplete cache files, e.g. {examples}"
    runs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    loaded = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    # they really overlapped: each started loading before the other had finished
    assert runs[0]["start"] < runs[1]["end"] and runs[1]["start"] < runs[0]["end"], runs
    assert not (runs[0]["hit"] and runs[1]["hit"]), "someone must have built the cache"
    # one cache file, no temporary file left behind
    (cache_file,) = cache_dir.iterdir()
    assert str(cache_file) == runs[0]["cache"] == runs[1]["cache"]
    assert cache_file.suffix == ".npz"
    # both got the same data, equal to a load that bypasses the cache
    truth = data.load("gtsrb", root=root, size=16, use_cache=False)
    for key in ARRAYS:
        np.testing.assert_array_equal(loaded[0][key], loaded[1][key], err_msg=key)
        np.testing.assert_array_equal(loaded[0][key], getattr(truth, key), err_msg=key)
    # and the cache left behind is valid: a later load is a hit with the same arrays
    again = data.load("gtsrb", root=root, cache_dir=cache_dir, size=16)
    assert again.info["cache_hit"]
    for key in ARRAYS:
        np.testing.assert_array_equal(getattr(again, key), getattr(truth, key), err_msg=key)


def test_no_writes_reads_but_never_writes_a_cache(tmp_path):
    from numexp.data import cache

    path = tmp_path / "c.npz"
    arrays = {"x": np.zeros(3, dtype=np.float32)}
    with cache.no_writes():
        assert cache.save_cache(path, "{}", arrays) is False and not path.exists()
    assert cache.save_cache(path, "{}", arrays) is True and path.exists()
    with cache.no_writes():
        assert cache.load_cache(path, "{}", lambda a: None)["x"].shape == (3,)
