"""debug=smoke on every experiment in conf/experiment/, so a broken experiment config never lands.

Covers, per experiment: every point of its grid composes and passes the value and model-fit checks
(in-process, fast), and a multirun of `+experiment=NAME debug=smoke` with each swept key held at its
first value trains to completion (1 epoch of 3 batches on 5% of the data) into results/smoke/.
Training every grid point would take about 30 s for reg_sweep alone. Experiments on MNIST or GTSRB
are skipped when the shared data are absent (CI sets NUMEXP_DATA_ROOT).
"""
import itertools
import json

import pytest
import yaml

from conftest import REPO, TINY, cli_env
from numexp import config, trainer

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
NEEDS_FILES = {"mnist": "MNIST", "gtsrb": "GTSRB", "cifar10": "cifar-10-batches-bin"}


def experiment(name):
    """(data set name, {swept key: [values]}) of conf/experiment/NAME.yaml."""
    spec = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text())
    data = next((d["override /data"] for d in spec.get("defaults", []) if "override /data" in d), "digits")
    params = spec.get("hydra", {}).get("sweeper", {}).get("params", {})
    return data, {k: str(v).split(",") for k, v in params.items()}


@pytest.fixture
def data_env(request):
    """The environment a run of ``data`` needs: skips when its files are absent."""
    def _env(data):
        if data not in NEEDS_FILES:
            return cli_env()
        root = request.getfixturevalue("shared_data")
        if not (root / NEEDS_FILES[data]).exists():
            pytest.skip(f"no {NEEDS_FILES[data]} under {root}")
        return cli_env(NUMEXP_DATA_ROOT=str(root))
    return _env


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_grid_point_composes_and_passes_the_checks(compose_cfg, name):
    _, params = experiment(name)
    for values in itertools.product(*params.values()):
        overrides = [f"+experiment={name}", "debug=smoke", *(f"{k}={v}" for k, v in zip(params, values))]
        cfg = config.task_config(compose_cfg(overrides))
        config.validate(cfg)
        config.check_model_fits(cfg)
        assert cfg.max_epochs == 1 and cfg.max_steps == 3 and cfg.data.fraction == 0.05, overrides


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_multirun_of_every_experiment(run_cli, tmp_path, data_env, name):
    data, params = experiment(name)
    env = data_env(data)
    first = [f"{k}={v[0]}" for k, v in params.items()]
    proc = run_cli("-m", f"+experiment={name}", "debug=smoke", *first, "hydra.launcher.n_jobs=1", env=env,
                   timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sweep_dir,) = tmp_path.glob("results/smoke/multirun/*/*")  # the preset's own output folder
    summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 1
    assert summary["data"]["options"]["fraction"] == 0.05


def test_max_steps_limits_the_batches_of_an_epoch(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(trainer.FAULT_ENV, "1:4")  # a fault at the 4th batch: reached only without the limit
    assert trainer.train(compose_cfg([*TINY, "max_steps=3"]), out_dir=tmp_path / "a")["status"] == "completed"
    assert trainer.train(compose_cfg(TINY), out_dir=tmp_path / "b")["status"] == "failed"
