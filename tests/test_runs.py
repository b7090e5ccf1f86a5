"""The runs table (`python -m numexp.runs`) on real tiny sweeps plus hand-made failed/incomplete/damaged runs."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from numexp import runs

TINY_DIGITS = ["data=digits", "model=mlp", "model.hidden=[32]", "lr=0.1", "hydra/launcher=basic"]
# three seed experiments shrunk to digits: 6 + 4 + 4 real runs, a few seconds in all
SWEEPS = {
    "svm": ["+experiment=svm_vs_softmax", "epochs=4", "schedule.step_size=2", "seed=0,1,2"],
    "reg": ["+experiment=reg_sweep", "epochs=2", "reg=0,1e-3"],
    "lr": ["+experiment=lr_schedule", "epochs=2", "seed=0,1"],
}
FAILED_ERROR = 'ValueError: bad value, "quoted"\nsecond line of the message'


def build_results(base):
    """``base/results``: the real sweeps of SWEEPS (run in parallel) and two hand-made runs of
    svm_vs_softmax in ``results/edge``: ``failed`` (seed 7) and ``incomplete`` (a copy of seed 1 that
    never wrote summary.json, as a killed run, later completed in the sweep). ``base/other`` holds a
    run with a damaged summary.json and one whose overrides lost ``+experiment``. Built once per
    session (test_report.py shares it)."""
    base = Path(base)
    if (base / "DONE").exists():
        return base
    base.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "numexp", "-m", *args, *TINY_DIGITS,
                                     f"hydra.sweep.dir=results/multirun/{name}"], cwd=base, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in SWEEPS.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"sweep {name} failed:\n{out}"
    sweep_dir = base / "results" / "multirun"

    failed = _copy_run(sweep_dir / "svm" / "0", base / "results" / "edge" / "failed")
    _set_seed(failed, 7)
    summary = json.loads((failed / "summary.json").read_text())
    summary.update(status="failed", error=FAILED_ERROR, val_acc=None, test_acc=None)
    (failed / "summary.json").write_text(json.dumps(summary))

    incomplete = _copy_run(sweep_dir / "svm" / "1", base / "results" / "edge" / "incomplete")
    (incomplete / "summary.json").unlink()
    lines = (incomplete / "metrics.csv").read_text().splitlines()
    (incomplete / "metrics.csv").write_text("\n".join(lines[:3]) + "\n")  # header + 2 epochs

    unreadable = _copy_run(sweep_dir / "svm" / "2", base / "other" / "unreadable")
    (unreadable / "summary.json").write_text("{not json")
    no_override = _copy_run(sweep_dir / "svm" / "4", base / "other" / "no_override")
    overrides = yaml.safe_load((no_override / ".hydra" / "overrides.yaml").read_text())
    (no_override / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([o for o in overrides if not o.startswith("+experiment")]))
    (base / "DONE").write_text("")
    return base


def _copy_run(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    return dst


def _set_seed(run_dir, seed):
    cfg_path = run_dir / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["seed"] = seed
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ov_path = run_dir / ".hydra" / "overrides.yaml"
    ov = [o if not o.startswith("seed=") else f"seed={seed}" for o in yaml.safe_load(ov_path.read_text())]
    ov_path.write_text(yaml.safe_dump(ov))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return build_results(tmp_path_factory.getbasetemp() / "numexp_runs_tree")


def run_module(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def summaries(folder):
    return {p.parent.name: json.loads(p.read_text()) for p in Path(folder).glob("*/summary.json")}


# --------------------------------------------------------------------------- the table

def test_table_has_one_row_per_run_and_only_the_config_keys_that_differ(tree):
    table = runs.runs_table([tree / "results" / "multirun" / "svm"], relative_to=tree)
    assert len(table) == 6
    assert table["run_dir"].tolist() == [f"results/multirun/svm/{i}" for i in range(6)]
    assert list(table.columns) == ["run_dir", "experiment", "status", "loss.name", "seed", *runs.METRIC_COLUMNS,
                                   "error"]
    assert (table["experiment"] == "svm_vs_softmax").all() and (table["status"] == "completed").all()
    assert table["loss.name"].tolist() == ["svm_l2"] * 3 + ["softmax"] * 3 and table["seed"].tolist() == [0, 1, 2] * 2
    # the metrics are the summaries' values
    for row, (_, s) in zip(table.itertuples(), sorted(summaries(tree / "results/multirun/svm").items())):
        assert (row.test_acc, row.val_acc, row.best_epoch, row.epochs_run) == (
            s["test_acc"], s["val_acc"], s["best_epoch"], s["epochs_run"])


def test_table_across_sweeps_keeps_failed_and_incomplete_runs_with_their_status(tree):
    table = runs.runs_table([tree / "results"], relative_to=tree)
    assert len(table) == 6 + 4 + 4 + 2
    by_dir = table.set_index("run_dir")
    failed, incomplete = by_dir.loc["results/edge/failed"], by_dir.loc["results/edge/incomplete"]
    assert failed["status"] == "failed" and failed["error"] == 'ValueError: bad value, "quoted" | second line of ' \
                                                                 'the message'
    assert failed["seed"] == 7 and pd.isna(failed["test_acc"])
    assert incomplete["status"] == "incomplete" and incomplete["epochs_run"] == 2 and pd.isna(incomplete["test_acc"])
    assert set(table["experiment"]) == {"svm_vs_softmax", "reg_sweep", "lr_schedule"}
    # keys that differ across the three experiments appear, constant ones do not
    assert {"loss.name", "schedule.name", "reg", "seed", "epochs"} <= set(table.columns)
    assert "model.name" not in table.columns and "batch_size" not in table.columns
    assert runs.config_columns(table) == runs.differing_keys(table)


def test_damaged_summary_is_listed_as_unreadable_and_experiment_falls_back_to_hydra_yaml(tree):
    table = runs.gather([tree / "other"], relative_to=tree).set_index("run_dir")
    bad = table.loc["other/unreadable"]
    assert bad["status"] == "unreadable" and "JSONDecodeError" in bad["error"]
    assert bad["experiment"] == "svm_vs_softmax" and bad["seed"] == 2
    assert table.loc["other/no_override", "experiment"] == "svm_vs_softmax"
    assert table.loc["other/no_override", "status"] == "completed"


def test_cli_writes_a_csv_that_reads_back_unchanged(tree, tmp_path):
    out = tmp_path / "table.csv"
    proc = run_module("numexp.runs", "results", "--out", str(out), cwd=tree)
    assert proc.returncode == 0, proc.stderr
    assert "16 runs: 14 completed, 1 failed, 1 incomplete" in proc.stdout
    expected = runs.runs_table([tree / "results"], relative_to=tree)
    back = pd.read_csv(out)
    pd.testing.assert_frame_equal(back, expected.astype(back.dtypes.to_dict()), check_exact=True)
    # a spreadsheet sees one header line and one line per run
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert len(out.read_text().splitlines()) == len(rows) == len(expected) + 1
    assert all(len(r) == len(rows[0]) for r in rows)


def test_cli_default_output_and_stdout(tree):
    proc = run_module("numexp.runs", cwd=tree)
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_csv(tree / "results" / "runs_table.csv")) == 16
    proc = run_module("numexp.runs", "results/multirun/reg", "--out", "-", cwd=tree)
    table = pd.read_csv(pd.io.common.StringIO(proc.stdout))
    assert len(table) == 4 and {"loss.name", "reg"} <= set(table.columns) and "seed" not in table.columns


# --------------------------------------------------------------------------- aggregation

def test_aggregate_known_answer_counts_failed_runs_but_keeps_them_out_of_the_statistics():
    table = pd.DataFrame({
        "run_dir": list("abcdefg"), "experiment": "x",
        "status": ["completed", "completed", "completed", "failed", "completed", "diverged", "incomplete"],
        "loss.name": ["svm", "svm", "svm", "svm", "softmax", "softmax", None],
        "test_acc": [0.90, 0.92, 0.97, None, 0.80, None, None]})
    agg = runs.aggregate(table, ["loss.name"])
    assert list(agg.columns) == ["loss.name", "n_runs", "n_not_completed", "test_acc_count", "test_acc_mean",
                                 "test_acc_std", "test_acc_min", "test_acc_max"]
    assert agg["loss.name"].tolist()[:2] == ["softmax", "svm"] and pd.isna(agg["loss.name"].iloc[2])
    svm = agg.iloc[1]
    assert (svm["n_runs"], svm["n_not_completed"], svm["test_acc_count"]) == (4, 1, 3)
    assert svm["test_acc_mean"] == pytest.approx(0.93)
    # sample std of 0.90, 0.92, 0.97: deviations -0.03, -0.01, 0.04 -> sqrt(0.0026 / 2)
    assert svm["test_acc_std"] == pytest.approx(math.sqrt(0.0026 / 2))
    assert (svm["test_acc_min"], svm["test_acc_max"]) == (0.90, 0.97)
    softmax, missing = agg.iloc[0], agg.iloc[2]
    assert (softmax["n_runs"], softmax["test_acc_count"], softmax["test_acc_mean"]) == (2, 1, 0.80)
    assert pd.isna(softmax["test_acc_std"])
    assert (missing["n_runs"], missing["n_not_completed"], missing["test_acc_count"]) == (1, 1, 0)


def test_cli_by_matches_the_summaries(tree):
    proc = run_module("numexp.runs", "results/multirun/svm", "--by", "loss.name", "--out", "-", cwd=tree)
    assert proc.returncode == 0, proc.stderr
    agg = pd.read_csv(pd.io.common.StringIO(proc.stdout)).set_index("loss.name")
    acc = {}
    for s in summaries(tree / "results/multirun/svm").values():
        loss = next(o.split("=")[1] for o in s["overrides"] if o.startswith("loss="))
        acc.setdefault(loss, []).append(s["test_acc"])
    for loss, values in acc.items():
        row = agg.loc[loss]
        assert row["test_acc_count"] == len(values) == 3
        assert row["test_acc_mean"] == pytest.approx(sum(values) / 3, abs=1e-15)
        assert (row["test_acc_min"], row["test_acc_max"]) == (min(values), max(values))
        assert row["test_acc_std"] == pytest.approx(pd.Series(values).std(), abs=1e-15)


def test_cli_by_a_constant_key_and_a_bad_key(tree):
    proc = run_module("numexp.runs", "results", "--by", "experiment", "model.name", "--out", "-", cwd=tree)
    agg = pd.read_csv(pd.io.common.StringIO(proc.stdout))
    assert agg["experiment"].tolist() == ["lr_schedule", "reg_sweep", "svm_vs_softmax"]
    assert agg["n_runs"].tolist() == [4, 4, 8] and agg["n_not_completed"].tolist() == [0, 0, 2]
    proc = run_module("numexp.runs", "results", "--by", "los.name", cwd=tree)
    assert proc.returncode == 2 and "los.name" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_folder_and_empty_folder_are_clear_errors(tmp_path):
    proc = run_module("numexp.runs", "nowhere", cwd=tmp_path)
    assert proc.returncode == 2 and "nowhere does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_module("numexp.runs", "empty", cwd=tmp_path)
    assert proc.returncode == 1 and "no run folders" in proc.stderr


def test_natural_order_puts_job_10_after_job_9():
    paths = ["s/10", "s/9", "s/1", "r/2"]
    assert sorted(paths, key=runs.natural_key) == ["r/2", "s/1", "s/9", "s/10"]


def test_flatten_gives_dotted_keys_and_list_text():
    assert runs.flatten({"model": {"name": "mlp", "hidden": [32, 64]}, "lr": 0.1, "augment": {"names": []}}) == {
        "model.name": "mlp", "model.hidden": "[32,64]", "lr": 0.1, "augment.names": "[]"}
