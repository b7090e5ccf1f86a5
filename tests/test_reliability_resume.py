"""Crash and resume: a run killed with SIGKILL mid-epoch continues with ``resume=true`` from its last
epoch checkpoint and ends with the same metrics.csv, checkpoint and confusion counts as an
uninterrupted run; a folder is never reused by accident; untrusted resume files are refused."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, cli_env, wait_while_running
from numexp import nn, rundir, trainer

# BatchNorm buffers, momentum, the dynamic schedule's best-model restores, random crops
KILLED = ["model=resnet_small", "model.channels=8", "optim=momentum", "lr=0.05", "schedule=dynamic",
          "schedule.step_size=2", "augment.names=[crop]", "epochs=5"]


def metrics_without_seconds(folder):
    return [line.rsplit(",", 1)[0] for line in (folder / "metrics.csv").read_text().splitlines()]


def assert_same_run(folder, reference):
    """Same metrics (but the seconds column), best checkpoint, confusion counts and summary metrics."""
    assert metrics_without_seconds(folder) == metrics_without_seconds(reference)
    ours, theirs = nn.load_npz(folder / "checkpoint.npz"), nn.load_npz(reference / "checkpoint.npz")
    assert list(ours) == list(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert (folder / "confusion.csv").read_text() == (reference / "confusion.csv").read_text()
    a, b = (json.loads((f / "summary.json").read_text()) for f in (folder, reference))
    keys = [*trainer.RESULT_KEYS, "status", "config_hash"]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert not (folder / "last.npz").exists()


def start(run_dir, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "numexp", *args, f"hydra.run.dir={run_dir}"],
                            env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(proc, condition, timeout=120):
    """SIGKILL ``proc`` as soon as ``condition()`` holds (polled every 2 ms)."""
    wait_while_running(proc, condition, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def rows(run_dir):
    try:
        return len((run_dir / "metrics.csv").read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def state_epoch(run_dir):
    meta = rundir.state_meta(run_dir / "last.npz") if (run_dir / "last.npz").exists() else None
    return meta["epochs_done"] if meta else 0


def test_sigkill_mid_epoch_then_resume_gives_the_same_run(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    # kill 1: the moment epoch 2's metrics row lands (during epoch 2's checkpoint writes or early in epoch 3)
    kill_when(start(run_dir, *KILLED), lambda: rows(run_dir) >= 2)
    assert not (run_dir / "summary.json").exists() and rows(run_dir) < 5
    # kill 2: in the middle of epoch 5, after epoch 4's state is saved
    kill_when(start(run_dir, *KILLED, "resume=true"), lambda: state_epoch(run_dir) >= 4)
    assert rows(run_dir) == 4 and not (run_dir / "summary.json").exists()
    proc = start(run_dir, *KILLED, "resume=true")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    trainer.train(compose_cfg(KILLED), out_dir=tmp_path / "uninterrupted")
    assert_same_run(run_dir, tmp_path / "uninterrupted")
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = summary["resumed_from_epochs"]
    assert first in (1, 2) and second == 4
    assert "resumed from epoch 4 of 5" in (run_dir / "numexp.log").read_text()


@pytest.mark.parametrize("optim", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_resume_after_a_crash_is_exact_for_every_optimizer(compose_cfg, tmp_path, monkeypatch, optim):
    # dropout masks and crops draw from the generators the state file carries; lr_decay uses opt.steps
    overrides = [*TINY, f"optim={optim}", "lr=1e-2", "epochs=4", "model.dropout=0.2", "augment.names=[crop]",
                 "schedule=exp_decay", "schedule.gamma=0.5"]
    if optim == "adagrad":
        overrides.append("optim.lr_decay=0.01")
    monkeypatch.setenv(trainer.FAULT_ENV, "3:5")  # an exception at step 5 of epoch 3
    crashed = trainer.train(compose_cfg(overrides), out_dir=tmp_path / "run")
    assert crashed["status"] == "failed" and crashed["error"].startswith("InjectedFault: injected fault at epoch 3")
    assert rows(tmp_path / "run") == 2 and state_epoch(tmp_path / "run") == 2
    monkeypatch.delenv(trainer.FAULT_ENV)
    resumed = trainer.train(compose_cfg([*overrides, "resume=true"]), out_dir=tmp_path / "run")
    assert resumed["status"] == "completed" and resumed["resumed_from_epochs"] == [2]
    trainer.train(compose_cfg(overrides), out_dir=tmp_path / "uninterrupted")
    assert_same_run(tmp_path / "run", tmp_path / "uninterrupted")


def test_resume_after_the_last_epoch_but_before_the_summary(compose_cfg, tmp_path, monkeypatch):
    """Killed between the final state and summary.json (here: early stopping had just fired)."""
    overrides = [*TINY, "epochs=10", "patience=2", "lr=1e-9"]
    monkeypatch.setattr(rundir.RunDir, "remove_state", lambda self: None)
    trainer.train(compose_cfg(overrides), out_dir=tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    monkeypatch.undo()
    resumed = trainer.train(compose_cfg([*overrides, "resume=true"]), out_dir=tmp_path / "run")
    assert resumed["stopped_early"] and resumed["epochs_run"] == 3
    trainer.train(compose_cfg(overrides), out_dir=tmp_path / "uninterrupted")
    assert_same_run(tmp_path / "run", tmp_path / "uninterrupted")


def test_resume_of_a_run_killed_in_its_first_epoch_starts_over(compose_cfg, tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)  # what Hydra had written before the kill
    summary = trainer.train(compose_cfg([*TINY, "resume=true"]), out_dir=tmp_path / "run")
    assert summary["status"] == "completed" and summary["resumed_from_epochs"] == []
    # resume=true on a folder that does not exist yet just starts the run (a script can always pass it)
    summary = trainer.train(compose_cfg([*TINY, "resume=true"]), out_dir=tmp_path / "new")
    assert summary["status"] == "completed"


def test_resume_refuses_a_folder_that_holds_no_run(compose_cfg, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(rundir.RunDirError, match="holds no numexp run"):
        trainer.train(compose_cfg([*TINY, "resume=true"]), out_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_stale_temp_files_of_killed_writers_are_removed_on_resume(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(trainer.FAULT_ENV, "2:1")
    trainer.train(compose_cfg(TINY), out_dir=tmp_path)
    monkeypatch.delenv(trainer.FAULT_ENV)
    (tmp_path / ".metrics.csv.4242.tmp").write_text("epoch,lr\n1,0.")
    (tmp_path / ".checkpoint.npz.4242.tmp").write_bytes(b"PK\x03\x04torn")
    assert trainer.train(compose_cfg([*TINY, "resume=true"]), out_dir=tmp_path)["status"] == "completed"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "git.diff") == [
        "checkpoint.npz", "confusion.csv", "metrics.csv", "status.json", "summary.json"]


def test_train_refuses_a_folder_holding_run_files_without_resume(compose_cfg, tmp_path):
    trainer.train(compose_cfg(TINY), out_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(rundir.RunDirError, match="add resume=true"):
        trainer.train(compose_cfg(TINY), out_dir=tmp_path)
    with pytest.raises(rundir.RunDirError, match="holds a run of another config"):
        trainer.train(compose_cfg([*TINY, "lr=1e-2", "resume=true"]), out_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --------------------------------------------------------------------------- through the command line

def snapshot(folder):
    """Every file under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = subprocess.run([sys.executable, "-m", "numexp", *TINY, f"hydra.run.dir={run_dir}"], env=cli_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.parametrize("extra, message", [
    ([], "run folder {run} is not empty: add resume=true to continue the run in it, or choose another folder"),
    (["lr=1e-2", "resume=true"], "holds a run of another config"),
])
def test_cli_refuses_to_reuse_a_run_folder_and_changes_nothing(finished_run, run_cli, extra, message):
    before = snapshot(finished_run)
    proc = run_cli(*TINY, *extra, f"hydra.run.dir={finished_run}")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and message.format(run=finished_run) in proc.stderr
    if "lr=1e-2" in extra:
        assert "lr: 0.003 -> 0.01" in proc.stderr
    assert snapshot(finished_run) == before, "Hydra did not touch .hydra/ or the log either"


def test_cli_resume_of_a_completed_run_skips_it(finished_run, run_cli):
    before = {k: v for k, v in snapshot(finished_run).items() if not k.startswith(".hydra") and k != "numexp.log"}
    proc = run_cli(*TINY, "resume=true", f"hydra.run.dir={finished_run}")
    assert proc.returncode == 0, proc.stderr
    assert "already completed" in proc.stdout + proc.stderr
    after = {k: v for k, v in snapshot(finished_run).items() if not k.startswith(".hydra") and k != "numexp.log"}
    assert after == before


def test_cli_resume_refuses_a_state_file_with_a_pickled_object(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "numexp", *TINY, "epochs=3", f"hydra.run.dir={run_dir}"],
                          env=cli_env(**{trainer.FAULT_ENV: "2:3"}), capture_output=True, text=True)
    assert proc.returncode == 1 and json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    # an attacker's last.npz: the real state plus an array that runs code when unpickled
    marker = tmp_path / "pwned"
    state = dict(np.load(run_dir / "last.npz"))
    state["model/fc1.weight"] = np.array([Exploit(str(marker))], dtype=object)
    np.savez(run_dir / "last.npz", **state)
    metrics = (run_dir / "metrics.csv").read_bytes()
    proc = run_cli(*TINY, "epochs=3", "resume=true", f"hydra.run.dir={run_dir}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output
    (error,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert f"checkpoint {run_dir / 'last.npz'} contains pickled objects; numexp refuses to unpickle" in error
    assert not marker.exists(), "the pickle was never loaded"
    assert (run_dir / "metrics.csv").read_bytes() == metrics and (run_dir / "last.npz").exists()
    assert "pickled objects" in json.loads((run_dir / "summary.json").read_text())["error"]


def test_a_torn_or_foreign_state_file_is_a_clear_error(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(trainer.FAULT_ENV, "2:1")
    trainer.train(compose_cfg(TINY), out_dir=tmp_path)
    monkeypatch.delenv(trainer.FAULT_ENV)
    good = (tmp_path / "last.npz").read_bytes()
    (tmp_path / "last.npz").write_bytes(good[: len(good) // 2])
    summary = trainer.train(compose_cfg([*TINY, "resume=true"]), out_dir=tmp_path)
    assert summary["status"] == "failed" and "is not a valid .npz file" in summary["error"]
    # a state from another model (same config hash forged): refused, named, nothing unpickled
    state = dict(np.load(tmp_path / "checkpoint.npz"))
    meta = json.dumps({"format": rundir.STATE_FORMAT, "config_hash": summary["config_hash"]})
    nn.save_npz(tmp_path / "last.npz", {"model/other.weight": state["fc1.weight"], "meta": np.array(meta)})
    summary = trainer.train(compose_cfg([*TINY, "resume=true"]), out_dir=tmp_path)
    assert summary["status"] == "failed" and "does not fit this run" in summary["error"]


class Exploit:
    """Unpickling this object creates a folder: proof that a loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)
