"""The trainer on digits: run folder contents, best checkpoint, schedules, early stop, divergence, determinism."""
import csv
import json
import logging

import numpy as np
import pytest

from conftest import TINY
from numexp import data, models, nn, trainer
from numexp.rundir import METRIC_COLUMNS


def run(compose_cfg, tmp_path, *overrides):
    cfg = compose_cfg([*TINY, *overrides])
    return trainer.train(cfg, out_dir=tmp_path), cfg


def read_metrics(folder):
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_run_folder_holds_metrics_summary_and_best_checkpoint(compose_cfg, tmp_path):
    summary, cfg = run(compose_cfg, tmp_path, "epochs=3")
    assert summary["status"] == "completed" and summary["error"] is None
    rows = read_metrics(tmp_path)
    assert list(rows[0]) == METRIC_COLUMNS == ["epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc",
                                               "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    best = max(rows, key=lambda r: float(r["val_acc"]))  # max() keeps the first of equal values, as the trainer
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["best_epoch"] == int(best["epoch"]) and on_disk["test_acc"] == float(best["test_acc"])
    assert on_disk["final_test_acc"] == float(rows[-1]["test_acc"]) and on_disk["epochs_run"] == 3
    assert on_disk["seed"] == 0 and on_disk["threads"] == 1
    assert len(on_disk["data"]["mean"]) == 1 and on_disk["data"]["in_shape"] == [1, 8, 8]
    # the checkpoint is the selected model: reloaded, it scores the summary's test accuracy
    ds = data.load("digits")
    model = models.build("mlp", ds.in_shape, ds.num_classes, hidden=[32])
    model.load_state_dict(nn.load_npz(tmp_path / "checkpoint.npz"))
    model.eval()
    assert np.mean(model(ds.x_test).argmax(axis=1) == ds.y_test) == pytest.approx(on_disk["test_acc"])


def test_same_seed_gives_identical_metrics(compose_cfg, tmp_path):
    for name in ("a", "b"):
        run(compose_cfg, tmp_path / name, "seed=3", "model.dropout=0.2", "augment.names=[crop]")
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(tmp_path / n)] for n in "ab"]
    assert strip[0] == strip[1]
    run(compose_cfg, tmp_path / "c", "seed=4", "model.dropout=0.2")
    assert read_metrics(tmp_path / "c")[0]["train_loss"] != strip[0][0]["train_loss"]


def test_dynamic_schedule_drops_lr_and_restores_the_best_model(compose_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="numexp.trainer"):
        run(compose_cfg, tmp_path, "epochs=5", "schedule=dynamic", "schedule.step_size=2", "lr=1e-2")
    assert [float(r["lr"]) for r in read_metrics(tmp_path)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4])
    assert sum("restored the best model" in m for m in caplog.messages) == 2


def test_early_stopping_after_patience_epochs_without_improvement(compose_cfg, tmp_path):
    summary, _ = run(compose_cfg, tmp_path, "epochs=10", "patience=2", "lr=1e-9")
    assert summary["stopped_early"] and summary["epochs_run"] == summary["best_epoch"] + 2


def test_nan_loss_stops_the_run_as_diverged(compose_cfg, tmp_path):
    summary, _ = run(compose_cfg, tmp_path, "optim=sgd", "lr=1e6", "epochs=3")
    assert summary["status"] == "diverged" and "loss became" in summary["error"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_model_that_does_not_fit_fails_before_training(compose_cfg, tmp_path):
    summary = trainer.train(compose_cfg(["model=lenet5", "epochs=1"]), out_dir=tmp_path)
    assert summary["status"] == "failed" and summary["error"].startswith("model=lenet5 does not fit data=digits")
    assert not (tmp_path / "metrics.csv").exists()


def test_blas_is_pinned_to_threads(compose_cfg, tmp_path):
    summary, _ = run(compose_cfg, tmp_path, "epochs=1", "threads=1")
    assert summary["blas"] and all(b["num_threads"] == 1 for b in summary["blas"])
    assert all("architecture" in b for b in summary["blas"])  # which kernels ran is part of the provenance


@pytest.mark.parametrize("schedule", ["fixed", "step", "exp_decay", "cosine", "dynamic"])
@pytest.mark.parametrize("loss", ["softmax", "svm_l1", "svm_l2"])
def test_every_loss_and_schedule_trains(compose_cfg, tmp_path, loss, schedule):
    summary, _ = run(compose_cfg, tmp_path, f"loss={loss}", f"schedule={schedule}", "epochs=1")
    assert summary["status"] == "completed"


@pytest.mark.parametrize("optim", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_every_optimizer_trains(compose_cfg, tmp_path, optim):
    summary, _ = run(compose_cfg, tmp_path, f"optim={optim}", "lr=1e-2", "epochs=2")
    assert summary["status"] == "completed" and summary["val_acc"] > 0.5


def test_unexpected_error_is_recorded_with_its_traceback_in_the_log(compose_cfg, tmp_path, monkeypatch, caplog):
    def broken_load(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trainer.data, "load", broken_load)
    with caplog.at_level(logging.ERROR, logger="numexp.trainer"):
        summary, _ = run(compose_cfg, tmp_path)
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: disk on fire"
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert any(r.exc_info for r in caplog.records)
