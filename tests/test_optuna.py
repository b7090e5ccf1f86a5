"""Search with Optuna: ``numexp -m +experiment=search`` (conf/experiment/search.yaml and its sweeper,
conf/hydra/sweeper/search.yaml) runs real trials on digits, lists them in runs.csv, names the best by
val_acc in optimization_results.yaml, suggests the same trials for the same sampler seed, and goes on
when a trial fails (it scores 0.0).

Each of the two searches is 3 one-epoch trials of a small MLP in a subprocess, as a user runs it (about
7 s, most of it importing optuna). Needs the search extra (``pip install -e ".[search]"``; ``.[test]``
has it) and skips without it.
"""
import json
import re
import sqlite3
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from conftest import cli_env
from numexp import config, sweep, trainer

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                    reason='hydra-optuna-sweeper is not installed: pip install -e ".[search]" (.[test] has it)')

TRIALS = 3
QUICK = ["+experiment=search", f"hydra.sweeper.n_trials={TRIALS}", "epochs=1", "model.hidden=[32]"]


def run_search(sweep_dir, *extra, env=None):
    """``numexp -m +experiment=search`` with 3 one-epoch trials into ``sweep_dir``."""
    return subprocess.run([sys.executable, "-m", "numexp", "-m", *QUICK, *extra, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=sweep_dir.parent, env=env or cli_env(), capture_output=True, text=True, timeout=300)


def log_range(params, key):
    """(low, high) of ``tag(log, interval(low, high))`` in the sweeper's params."""
    match = re.fullmatch(r"tag\(log, interval\(([^,]+), ([^)]+)\)\)", params[key])
    assert match, f"{key} is not searched on a log scale: {params[key]}"
    return float(match[1]), float(match[2])


def trial_overrides(sweep_dir, job):
    """The job's ``lr=...`` and ``reg=...`` overrides, as the sweeper wrote them."""
    overrides = yaml.safe_load((sweep_dir / str(job) / ".hydra" / "overrides.yaml").read_text())
    return [o for o in overrides if o.partition("=")[0] in ("lr", "reg")]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """(process, sweep folder) of the quick search."""
    sweep_dir = tmp_path_factory.mktemp("search") / "sweep"
    return run_search(sweep_dir), sweep_dir


@pytest.fixture(scope="module")
def searched_again(tmp_path_factory, searched):
    """(process, sweep folder, failing job) of the same search again, with the study in SQLite and the
    first search's best trial made to fail (at its first training step, through ``$NUMEXP_INJECT_FAULT``)."""
    _, first_dir = searched
    table = pd.read_csv(first_dir / "runs.csv")
    best_job = int(table.loc[table["val_acc"].idxmax(), "job"])
    lr_override = next(o for o in trial_overrides(first_dir, best_job) if o.startswith("lr="))
    sweep_dir = tmp_path_factory.mktemp("again") / "sweep"
    proc = run_search(sweep_dir, f"hydra.sweeper.storage=sqlite:///{sweep_dir.parent / 'study.db'}",
                      env=cli_env(**{trainer.FAULT_ENV: f"1:1@{lr_override}"}))
    return proc, sweep_dir, best_job


def test_search_config_maximises_val_acc_with_a_fixed_seed(compose_cfg):
    sweeper = compose_cfg(["+experiment=search"], hydra=True).hydra.sweeper
    assert sweeper._target_.endswith(".OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    assert set(sweeper.params) == {"lr", "reg"}
    assert log_range(sweeper.params, "lr") == (1e-4, 1e-1) and log_range(sweeper.params, "reg") == (1e-6, 1e-2)


@pytest.mark.slow
def test_search_lists_every_trial_with_its_lr_and_reg_in_runs_csv(searched, compose_cfg):
    proc, sweep_dir = searched
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert table["job"].tolist() == list(range(TRIALS)) and (table["status"] == "completed").all(), table
    # the suggested values come first, as the keys that vary
    assert list(table.columns[:3]) == ["job", "lr", "reg"]
    params = compose_cfg(["+experiment=search"], hydra=True).hydra.sweeper.params
    for key in ("lr", "reg"):
        low, high = log_range(params, key)
        assert table[key].between(low, high).all() and table[key].nunique() == TRIALS, table[key]
    # each run trained with the values its row shows
    for _, row in table.iterrows():
        run_cfg = yaml.safe_load((sweep_dir / str(row["job"]) / ".hydra" / "config.yaml").read_text())
        assert (run_cfg["lr"], run_cfg["reg"]) == (row["lr"], row["reg"])
    # numexp collect rebuilds the same table from the folders
    assert sweep.collect(sweep_dir).to_csv(index=False) == (sweep_dir / "runs.csv").read_text()


@pytest.mark.slow
def test_optimization_results_name_the_trial_with_the_best_val_acc(searched):
    _, sweep_dir = searched
    table = pd.read_csv(sweep_dir / "runs.csv")
    # distinct accuracies, so the best is one trial and maximising differs from minimising
    assert table["val_acc"].nunique() == TRIALS, table
    best = table.loc[table["val_acc"].idxmax()]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"lr": best["lr"], "reg": best["reg"]}
    assert results["best_value"] == best["val_acc"]


@pytest.mark.slow
def test_the_same_sampler_seed_suggests_the_same_trials(searched, searched_again):
    (_, first_dir), (_, again_dir, _) = searched, searched_again
    # the first 10 trials of TPE are seeded random draws, whatever the runs score
    for job in range(TRIALS):
        assert trial_overrides(again_dir, job) == trial_overrides(first_dir, job), job


@pytest.mark.slow
def test_a_failed_trial_scores_zero_and_the_search_goes_on(searched, searched_again):
    (_, first_dir), (proc, again_dir, failed_job) = searched, searched_again
    # the sweep ends as any sweep with a failed run: runs.csv lists it, exit code 1
    assert proc.returncode == 1, proc.stderr[-3000:]
    table = pd.read_csv(again_dir / "runs.csv")
    assert len(table) == TRIALS
    failed = table.loc[table["job"] == failed_job].iloc[0]
    assert failed["status"] == "failed" and failed["error"].startswith("InjectedFault: injected fault at epoch 1")
    done = table[table["job"] != failed_job]
    assert (done["status"] == "completed").all(), table
    # the other trials trained as in the first search (runs are deterministic) ...
    first = pd.read_csv(first_dir / "runs.csv").set_index("job")
    assert done.set_index("job")["val_acc"].equals(first.loc[done["job"], "val_acc"])
    # ... and the best of them is the study's best: the failed trial, best in the first search, counted 0.0
    best = done.loc[done["val_acc"].idxmax()]
    results = yaml.safe_load((again_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"lr": best["lr"], "reg": best["reg"]}
    assert results["best_value"] == best["val_acc"]


@pytest.mark.slow
def test_sqlite_storage_keeps_the_study(searched_again):
    """hydra.sweeper.storage=sqlite:///... (optuna 2.x needs SQLAlchemy < 2 for it: the search extra)."""
    _, again_dir, failed_job = searched_again
    with sqlite3.connect(again_dir.parent / "study.db") as db:
        values = db.execute("SELECT trials.number, trial_values.value FROM trials JOIN trial_values "
                            "USING (trial_id) ORDER BY trials.number").fetchall()
    table = pd.read_csv(again_dir / "runs.csv")
    expected = [0.0 if job == failed_job else val for job, val in zip(table["job"], table["val_acc"])]
    assert values == list(enumerate(expected))


@pytest.fixture
def job_context(compose_cfg, tmp_path, monkeypatch):
    """``job_context(overrides)``: the task config of a multirun job, with Hydra's config of that job
    in effect (as in a launcher's worker), writing into ``tmp_path/run``."""
    monkeypatch.setattr(trainer, "_warnings_to_log", lambda: None)  # keeps pytest's warning handling

    def _context(overrides):
        cfg = compose_cfg(overrides, hydra=True)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        return config.task_config(cfg)

    yield _context
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("overrides, status", [([], "completed"), (["optim=sgd", "lr=1e6"], "diverged"),
                                               (["data.fraction=0"], "failed")])
def test_task_gives_optuna_val_acc_and_zero_for_a_run_that_did_not_complete(job_context, tmp_path, overrides,
                                                                             status):
    cfg = job_context(["+experiment=search", "epochs=1", "model.hidden=[32]", *overrides])
    objective = trainer.task(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == status and type(objective) is float
    assert objective == (summary["val_acc"] if status == "completed" else 0.0)
    if status == "completed":
        assert 0.5 < objective <= 1.0


def test_task_still_returns_the_summary_under_the_basic_sweeper(job_context, tmp_path):
    summary = trainer.task(job_context(["epochs=1", "model=mlp", "model.hidden=[32]", "optim=sgd", "lr=1e6"]))
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == written["status"] == "diverged" and summary["config_hash"] == written["config_hash"]
