"""`numexp plan`: the jobs a multirun would start (as Hydra makes them) and their estimated time, starting none.

No assertion on measured times beyond their sign and how they combine: the machine may be busy.
"""
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import TINY, cli_env
from numexp import config, plan

# sweep params from an experiment file (optim x lr) with optim replaced on the command line
SWEEP = ["+experiment=optimizers", "data=digits", "model=mlp", "model.hidden=[16]", "epochs=2", "optim=sgd,adam"]


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """A real multirun of :data:`SWEEP` (4 tiny runs on digits), run once for the module."""
    cwd = tmp_path_factory.mktemp("real")
    sweep_dir = cwd / "sweep"
    proc = subprocess.run([sys.executable, "-m", "numexp", "-m", *SWEEP, "hydra.launcher.n_jobs=2",
                           f"hydra.sweep.dir={sweep_dir}"], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return sweep_dir


def plan_of(*overrides):
    return plan.make_plan(list(overrides))


def test_jobs_equal_the_overrides_and_configs_of_a_real_multirun(real_sweep, tmp_path):
    _, jobs = plan.make_jobs([*SWEEP, "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'new'}"])
    real = [yaml.safe_load((real_sweep / str(n) / ".hydra" / "overrides.yaml").read_text()) for n in range(4)]
    assert not (real_sweep / "4").exists()
    assert [job.overrides for job in jobs] == real
    # the command line's optim=sgd,adam replaced the experiment's six optimizers, in the param's place
    assert [o[:2] for o in real] == [["optim=sgd", "lr=0.01"], ["optim=sgd", "lr=0.001"],
                                     ["optim=adam", "lr=0.01"], ["optim=adam", "lr=0.001"]]
    for job in jobs:
        summary = json.loads((real_sweep / str(job.num) / "summary.json").read_text())
        assert config.config_hash(job.cfg) == summary["config_hash"], job.overrides


def test_estimate_is_positive_and_scales_with_epochs(tmp_path):
    short, long = plan_of(*TINY, "epochs=2,20", "hydra.launcher.n_jobs=1").jobs
    assert (short.epochs, long.epochs) == (2, 20) and short.timing_key == long.timing_key
    assert 0 < short.startup and 0 < short.epoch_seconds == long.epoch_seconds
    # the startups differ by each job's own composition time (the first is slower): compare the training
    assert 0 < short.seconds - short.startup < long.seconds - long.startup
    assert long.seconds - long.startup == pytest.approx(10 * (short.seconds - short.startup))


def test_wall_time_adds_up_runs_over_the_launchers_parallelism():
    one_at_a_time = plan_of(*TINY, "seed=0,1,2,3", "hydra.launcher.n_jobs=1")
    seconds = [job.seconds for job in one_at_a_time.jobs]
    assert len(seconds) == 4 and one_at_a_time.launcher.slots == 1
    assert one_at_a_time.wall == pytest.approx(one_at_a_time.overhead + sum(seconds))
    if plan.available_cores() >= 2:
        two = plan_of(*TINY, "seed=0,1,2,3", "hydra.launcher.n_jobs=2")
        assert two.launcher.slots == 2
        assert two.wall == pytest.approx(two.overhead + plan.schedule([job.seconds for job in two.jobs], 2))
    every_core = plan_of(*TINY, "seed=0,1")
    assert every_core.launcher.slots == plan.available_cores()  # the default n_jobs=-1


def test_schedule_hands_each_run_to_the_first_free_worker():
    assert plan.schedule([1, 1, 1, 1], 1) == 4
    assert plan.schedule([1, 1, 1, 1], 2) == 2
    assert plan.schedule([1, 1, 1, 1], 8) == 1
    assert plan.schedule([3, 1, 1, 1], 2) == 3
    assert plan.schedule([], 2) == 0
    assert [plan.joblib_workers(n, 8) for n in (-1, -2, None, 3)] == [8, 7, 1, 3]


def test_more_threads_than_cores_is_a_warning():
    cores = plan.available_cores()
    result = plan_of(*TINY, "seed=0,1", "hydra.launcher.n_jobs=2", f"threads={cores}")
    text = plan.plan_text(result)
    assert f"2 runs at once x threads={cores}" in text and "would slow each other" in text


def test_resume_skips_completed_runs_and_continues_unfinished_ones(real_sweep, tmp_path):
    sweep_dir = tmp_path / "copy"
    shutil.copytree(real_sweep, sweep_dir)
    (sweep_dir / "1" / "summary.json").unlink()  # killed before its first epoch ended
    (sweep_dir / "2" / "summary.json").unlink()  # killed after epoch 1 of 2, with its resume state
    (sweep_dir / "2" / "last.npz").write_bytes(b"")
    (sweep_dir / "2" / "status.json").write_text(json.dumps({"state": "running", "epoch": 1}))
    result = plan_of(*SWEEP, f"hydra.sweep.dir={sweep_dir}", "resume=true")
    assert [job.state for job in result.jobs] == ["skipped", "new", "continue", "skipped"]
    assert [job.epochs for job in result.jobs[1:3]] == [2, 1]
    assert all(job.seconds == 0 for job in result.jobs if job.state == "skipped")
    assert "2 runs to start (2 skipped: completed)" in plan.plan_text(result)
    assert sum(job.seconds for job in result.jobs) + result.overhead >= result.wall > result.overhead


def test_a_used_sweep_folder_without_resume_is_refused_like_the_real_command(real_sweep, capsys):
    with pytest.raises(SystemExit) as stop:
        plan.main([*SWEEP, f"hydra.sweep.dir={real_sweep}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "resume=true" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("override, named", [("lr=abc", "lr"), ("+bogus=1", "bogus"), ("model=lenet5", "lenet5"),
                                             ("reg=0,-1", "reg"), ("model=nope", "model"),
                                             ("hydra.launcher.n_jobs=1,2", "n_jobs")])
def test_a_bad_override_exits_2_with_one_line(override, named, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        plan.main(["epochs=1", override])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and not out
    assert err.startswith("numexp: error: ") and named in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_numexp_plan_prints_the_runs_and_writes_nothing(tmp_path):
    args = [*TINY, "reg=0,1e-4", "hydra.launcher.n_jobs=2"]
    for command in (["-m", "numexp", "plan", *args], ["-m", "numexp.plan", "-m", *args]):
        proc = subprocess.run([sys.executable, *command], cwd=tmp_path, env=cli_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split() == ["job", "estimate", "overrides"]
        # Hydra writes the values in its own form (lr=3e-3 -> lr=0.003), as in the runs' overrides.yaml
        assert lines[1].startswith("0 ") and lines[1].endswith(" reg=0")
        assert lines[2].startswith("1 ") and lines[2].endswith(" reg=0.0001") and "model.hidden=[32]" in lines[2]
        assert "2 runs to start" in proc.stdout and "wall time: about" in proc.stdout and "/step" in proc.stdout
    assert not any(tmp_path.iterdir()), "plan writes nothing"


# the launcher files carry the plugins' own option names on purpose (see conf/hydra/launcher/)
@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")
def test_a_cluster_launcher_gets_a_per_job_time_limit():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = plan_of(*TINY, "seed=0,1", "hydra/launcher=submitit_slurm")
    text = plan.plan_text(result)
    limit = plan.time_limit_minutes(result.jobs)
    assert result.launcher.cluster and f"hydra.launcher.timeout_min={limit}" in text
    assert limit >= max(job.seconds for job in result.jobs) * plan.TIME_LIMIT_MARGIN / 60
