"""status.json in every run folder and `numexp status SWEEP_DIR`: while a sweep runs, after it, after a crash."""
import json
import shutil
import subprocess
import sys
import time

from conftest import TINY, cli_env


def status(sweep_dir, cwd):
    proc = subprocess.run([sys.executable, "-m", "numexp", "status", str(sweep_dir)], cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_status_while_a_sweep_runs_in_another_process_and_after(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # resnet_small epochs take a noticeable fraction of a second: the sweep is caught running
    cmd = [sys.executable, "-m", "numexp", "-m", "epochs=4", "seed=0,1,2", "hydra.launcher.n_jobs=2",
           f"hydra.sweep.dir={sweep_dir}"]
    sweep = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    seen_running = None
    deadline = time.monotonic() + 120
    while sweep.poll() is None and time.monotonic() < deadline:
        if sweep_dir.is_dir():
            out = status(sweep_dir, tmp_path)
            if any(line.split()[1:2] == ["running"] for line in out.splitlines()[1:-1]):
                seen_running = out
                break
        time.sleep(0.2)
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 0, err
    # a fast machine may finish first; on this one the sweep is caught running
    if seen_running is not None:
        last = seen_running.splitlines()[-1]
        assert last.startswith("3 runs:") and " 0 running" not in last and "time left" in last, seen_running
    out = status(sweep_dir, tmp_path)
    lines = out.splitlines()
    assert [line.split()[:3] for line in lines[1:-1]] == [[str(j), "completed", "4/4"] for j in range(3)], out
    assert lines[-1].startswith("3 runs: 3 done, 0 running, 0 failed, 0 pending; best val_acc ") and \
        lines[-1].endswith("time left none"), out
    st = json.loads((sweep_dir / "0" / "status.json").read_text())
    assert st["state"] == "completed" and st["epoch"] == st["epochs"] == 4 and st["seconds_per_epoch"] > 0
    assert st["best_val_acc"] == json.loads((sweep_dir / "0" / "summary.json").read_text())["val_acc"]


def test_a_killed_run_is_shown_killed_not_running(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "epochs=3", f"hydra.run.dir={run_dir}", env=cli_env(NUMEXP_INJECT_FAULT="kill:2:1"))
    assert proc.returncode != 0
    st = json.loads((run_dir / "status.json").read_text())
    assert st["state"] == "running" and st["epoch"] == 1 and st["epochs"] == 3  # written after epoch 1
    out = status(run_dir, tmp_path)
    assert out.splitlines()[1].split()[1:3] == ["killed", "1/3"], out
    assert out.splitlines()[-1].startswith("1 runs: 0 done, 0 running, 1 failed, 0 pending"), out


def test_jobs_not_started_are_pending_and_time_left_is_estimated(run_cli, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "reg=0,1e-4,1e-3", "hydra.launcher.n_jobs=1", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr
    # as if copied back from a cluster mid-sweep: job 2 not started, job 0 at epoch 1 of 2 elsewhere
    shutil.rmtree(sweep_dir / "2")
    st = json.loads((sweep_dir / "0" / "status.json").read_text())
    st.update(state="running", epoch=1, host="another-host", pid=1, seconds_per_epoch=30.0)
    (sweep_dir / "0" / "status.json").write_text(json.dumps(st))
    (sweep_dir / "1" / "status.json").write_text(json.dumps({**st, "state": "completed", "epoch": 2}))
    last = status(sweep_dir, tmp_path).splitlines()[-1]
    # 1 epoch left of job 0 + 2 epochs of job 2, at 30 s each, one run going: 90 s
    assert last.startswith("3 runs: 1 done, 1 running, 0 failed, 1 pending;") and last.endswith("about 1m30s"), last


def test_status_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "numexp.status", str(tmp_path / "nope")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "usage: numexp status" in proc.stderr
