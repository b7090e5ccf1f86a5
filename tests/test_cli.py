"""`python -m numexp` as a user runs it: default run, config errors, --cfg job, joblib multiruns, collect."""
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import TINY
from numexp import sweep, trainer


def only_run(tmp_path):
    (folder,) = [p.parent for p in tmp_path.glob("results/runs/*/*/.hydra")]
    return folder


def test_default_run_reaches_97_percent_on_digits(run_cli, tmp_path):
    proc = run_cli()
    assert proc.returncode == 0, proc.stderr
    folder = only_run(tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_acc"] >= 0.97
    # last.npz (the resume state) is gone once the run completes
    # git.diff too while numexp's source tree has uncommitted changes
    assert sorted(p.name for p in folder.iterdir() if p.name != "git.diff") == [
        ".hydra", "checkpoint.npz", "confusion.csv", "metrics.csv", "numexp.log", "status.json", "summary.json"]
    log = (folder / "numexp.log").read_text()
    assert log.count(" - epoch ") == summary["epochs_run"] and "completed: best epoch" in log


@pytest.mark.parametrize("override, key", [("lr=-1", "lr"), ("epochs=0", "epochs"), ("model=lenet5", "model=lenet5"),
                                           ("+bogus=1", "bogus")])
def test_invalid_value_exits_with_one_line_naming_the_key(run_cli, tmp_path, override, key):
    proc = run_cli(override)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], output
    assert not (tmp_path / "results").exists(), "refused before Hydra creates the run folder"


@pytest.mark.parametrize("override, key", [("lr=abc", "lr"), ("lr_rate=1", "lr_rate"), ("model=nope", "model")])
def test_hydra_composition_errors_are_one_line(run_cli, override, key):
    proc = run_cli(override)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.startswith("numexp: error: ") and key in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_cfg_job_shows_the_composed_config(run_cli, tmp_path):
    proc = run_cli("--cfg", "job", "reg=0")
    assert proc.returncode == 0
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["reg"] == 0.0 and cfg["model"]["name"] == "resnet_small"
    assert not (tmp_path / "results").exists()


def test_console_script_is_installed():
    script = shutil.which("numexp", path=str(Path(sys.executable).parent))
    assert script, "pip install puts the numexp console script next to python"


def test_multirun_through_joblib_writes_runs_csv(run_cli, tmp_path, compose_cfg):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "reg=0,1e-4,1e-3", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert table["reg"].tolist() == [0, 1e-4, 1e-3] and (table["status"] == "completed").all()
    assert list(table.columns[:2]) == ["job", "reg"] and {"val_acc", "test_acc", "best_epoch"} <= set(table.columns)
    for job in range(3):
        assert {"metrics.csv", "summary.json", "checkpoint.npz", "numexp.log"} <= {
            p.name for p in (sweep_dir / str(job)).iterdir()}
    # collect only reads the folders, so it rebuilds the same table at any time
    assert sweep.collect(sweep_dir).to_csv(index=False) == (sweep_dir / "runs.csv").read_text()
    # a job in a joblib worker computes exactly what the same run computes in this process
    trainer.train(compose_cfg([*TINY, "reg=1e-4"]), out_dir=tmp_path / "single")
    in_worker, here = (pd.read_csv(folder / "metrics.csv").drop(columns="seconds")
                       for folder in (sweep_dir / "1", tmp_path / "single"))
    pd.testing.assert_frame_equal(in_worker, here)


def test_failed_runs_keep_the_sweep_going_and_make_the_exit_code_nonzero(run_cli, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "optim=sgd", "lr=1e-2,1e6", "data.fraction=1,0", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 1
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert table["status"].tolist() == ["completed", "failed", "diverged", "failed"]
    assert table["error"][1] == "data.fraction=0.0 is invalid: must be in (0, 1]"
    output = proc.stdout + proc.stderr
    assert "diverged: loss became" in output and "Traceback" not in output


def test_collect_command_rebuilds_runs_csv(run_cli, tmp_path):
    assert run_cli("-m", *TINY, "seed=0,1").returncode == 0
    # the default sweep folder: runs.csv lands next to the job folders (Hydra resolves ${now:} once)
    (sweep_dir,) = tmp_path.glob("results/multirun/*/*")
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml", "runs.csv"]
    (sweep_dir / "runs.csv").unlink()
    proc = run_cli("collect", str(sweep_dir))
    assert proc.returncode == 0, proc.stderr
    assert pd.read_csv(sweep_dir / "runs.csv")["seed"].tolist() == [0, 1]


def test_lenet5_mnist_experiment_runs_on_the_shared_data(run_cli, tmp_path, shared_data):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", "+experiment=lenet5_mnist", "epochs=1", "data.fraction=0.05", f"data.root={shared_data}",
                   f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert len(table) == 4 and {"model.activation", "model.pool"} <= set(table.columns)
