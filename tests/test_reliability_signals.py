"""SIGTERM (``kill``, ``timeout``, a scheduler stopping the job) ends numexp as Ctrl-C does: a run records
itself as interrupted and keeps its last epoch for ``resume=true``; a sweep stops its joblib workers,
writes runs.csv and says how to go on. Exit code 128 + 15."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from conftest import cli_env, wait_while_running

# long enough to be stopped in the middle (about 9 ms an epoch here), short enough to resume
LONG = ["model=mlp", "model.hidden=[16]", "optim=sgd", "schedule=fixed", "epochs=300"]


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "numexp", *args], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def status(run_dir):
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
        return {}


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_records_the_run_as_interrupted_and_resume_finishes_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(*LONG, f"hydra.run.dir={run_dir}")
    wait_while_running(proc, lambda: status(run_dir).get("epoch", 0) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "numexp: error: stopped by SIGTERM; an interrupted run keeps its last finished epoch: run the same "
        "command with resume=true to continue it")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["error"]) == ("interrupted", "stopped by SIGTERM")
    assert (run_dir / "last.npz").exists()
    done = subprocess.run([sys.executable, "-m", "numexp", *LONG, f"hydra.run.dir={run_dir}", "resume=true"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 300
    assert summary["resumed_from_epochs"] and summary["resumed_from_epochs"][0] >= 2


def test_sigterm_stops_a_sweeps_workers_and_still_writes_runs_csv(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = start("-m", *LONG, "epochs=1000", "seed=0,1,2", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}")
    runs = [sweep_dir / "0", sweep_dir / "1"]
    wait_while_running(proc, lambda: all(status(run).get("epoch", 0) >= 1 for run in runs))
    workers = {status(run)["pid"] for run in runs}
    assert proc.pid not in workers and len(workers) == 2
    proc.send_signal(signal.SIGTERM)  # to numexp's own process only, not its workers
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "numexp: error: stopped by SIGTERM; completed runs are kept: run the same command with resume=true to "
        "continue the others")
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "the sweep's workers outlived it"
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert list(table["seed"]) == [0, 1] and (table["status"] == "incomplete").all()
    assert all((run / "last.npz").exists() for run in runs)  # what resume=true continues from
    assert not os.path.exists(sweep_dir / "2")  # never started


def as_in_a_terminal():
    """Run in the child before numexp starts: Ctrl-C's SIGINT as a terminal's foreground job has it. A test
    runner started in the background (``&`` in a script, nohup) hands its children SIGINT ignored, and Python
    keeps ignoring what it inherits ignored: the sweep would then run on to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_on_a_sweep_ends_it_with_one_line_and_runs_csv(tmp_path):
    """Ctrl-C reaches the terminal's whole process group: each worker's run records itself as interrupted,
    unless joblib stops that worker first (then it is incomplete); either way resume=true continues it."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "numexp", "-m", *LONG, "epochs=1000", "seed=0,1,2",
                             "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}"], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=as_in_a_terminal)
    runs = [sweep_dir / "0", sweep_dir / "1"]
    wait_while_running(proc, lambda: all(status(run).get("epoch", 0) >= 1 for run in runs))
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "numexp: error: interrupted (Ctrl-C); completed runs are kept: run the same command with resume=true to "
        "continue the others")
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert list(table["seed"]) == [0, 1] and set(table["status"]) <= {"interrupted", "incomplete"}


def test_sigterm_to_a_run_with_replicas_and_all_its_processes_ends_it_with_one_line(tmp_path):
    """As a scheduler does: every process of the job gets SIGTERM; the run ends with its one line, the
    replicas die quietly (no traceback of theirs) and the summary says interrupted."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "numexp", *LONG, "threads=2", f"hydra.run.dir={run_dir}"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_while_running(proc, lambda: status(run_dir).get("epoch", 0) >= 2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "stopped by SIGTERM" in err, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["parallel"]["replicas"] == 2
