"""`numexp eval`: a finished GTSRB run's checkpoint reproduces its recorded test accuracy; tables and figures."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from sklearn.metrics import precision_recall_fscore_support

from numexp import evaluate, predict, report
from numexp.data.images import normalize
from test_predict import NAMES, copy_run, train_gtsrb_run

PNG = b"\x89PNG\r\n\x1a\n"
FILES = {"eval.json", "per_class.csv", "confusion_matrix.csv", "confusion.png", "mistakes.png", "predictions.png"}


@pytest.fixture(scope="module")
def gtsrb_run(tmp_path_factory, shared_data):
    return train_gtsrb_run(tmp_path_factory.getbasetemp(), shared_data)


@pytest.fixture(scope="module")
def evaluated(gtsrb_run, shared_data):
    """``numexp eval RUN`` (the console script) on the run's own test split: (stdout, output folder)."""
    script = Path(sys.executable).with_name("numexp")
    proc = subprocess.run([str(script), "eval", str(gtsrb_run)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NUMEXP_DATA_ROOT": str(shared_data)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, gtsrb_run / "eval" / "test"


@pytest.fixture(scope="module")
def scored(gtsrb_run, shared_data):
    """The Evaluation of the run's test split."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NUMEXP_DATA_ROOT", str(shared_data))
        return evaluate.evaluate(predict.load_run(gtsrb_run))


def test_eval_of_a_finished_run_reproduces_its_recorded_test_accuracy_exactly(gtsrb_run, evaluated):
    text, out = evaluated
    summary = json.loads((gtsrb_run / "summary.json").read_text())
    result = json.loads((out / "eval.json").read_text())
    assert result["split"] == "test" and result["images"] == summary["data"]["sizes"]["test"]
    assert result["accuracy"] == summary["test_acc"] and result["reproduced"] is True
    assert result["correct"] == round(summary["test_acc"] * result["images"])
    assert "reproduced exactly" in text and f"{100 * summary['test_acc']:.2f}%" in text


def test_eval_writes_every_file(evaluated):
    _, out = evaluated
    assert {p.name for p in out.iterdir()} == FILES


def test_figures_are_non_empty_pngs(evaluated):
    _, out = evaluated
    for name in ("confusion.png", "mistakes.png", "predictions.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 20_000, name
        image = imread(path)
        assert image.shape[0] >= 400 and image.shape[1] >= 800, name
        codes = (image[..., :3] * 255).astype(np.int64) @ np.array([65536, 256, 1])
        assert np.unique(codes).size > 500, name  # photographs or a filled matrix, not a blank canvas


def test_per_class_table_agrees_with_sklearn_and_the_confusion_matrix(evaluated, scored):
    _, out = evaluated
    table = pd.read_csv(out / "per_class.csv")
    assert table["name"].tolist() == NAMES and table["label"].tolist() == list(range(43))
    precision, recall, _, support = precision_recall_fscore_support(
        scored.y, scored.pred, labels=range(43), zero_division=np.nan)
    np.testing.assert_allclose(table["precision"], precision, atol=5e-5)  # the CSV keeps 4 decimals
    np.testing.assert_allclose(table["recall"], recall, atol=5e-5)
    assert table["support"].tolist() == support.tolist()
    matrix = pd.read_csv(out / "confusion_matrix.csv", index_col=0).to_numpy()
    assert matrix.sum() == len(scored.y) and np.trace(matrix) == scored.correct
    assert matrix.sum(axis=0).tolist() == table["predicted"].tolist()


def test_eval_and_the_reports_confusion_matrix_agree(gtsrb_run, shared_data, scored, monkeypatch):
    monkeypatch.setenv("NUMEXP_DATA_ROOT", str(shared_data))
    matrix, _ = report.confusion_matrix(gtsrb_run)
    assert np.array_equal(matrix, evaluate.confusion_counts(scored.y, scored.pred, 43))


def test_worst_mistakes_are_wrong_and_most_confident_first(scored):
    idx = evaluate.worst_mistakes(scored, 10)
    assert len(idx) == 10 and (scored.pred[idx] != scored.y[idx]).all()
    top = scored.outputs[idx, scored.pred[idx]]
    assert (np.diff(top) <= 0).all()
    wrong = scored.pred != scored.y
    assert top[0] == scored.outputs[wrong].max()


def test_prediction_grid_marks_mistakes_in_red(scored):
    idx = np.arange(12)
    fig = evaluate.prediction_grid(scored.x[idx], scored.y[idx], scored.pred[idx], NAMES,
                                   scored.run.mean, scored.run.std)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 12
    for ax, t, p in zip(axes, scored.y[idx], scored.pred[idx]):
        colour = evaluate.WRONG_COLOUR if t != p else evaluate.CORRECT_COLOUR
        assert ax.title.get_color() == colour
        assert NAMES[p] in ax.title.get_text() or NAMES[p][:20] in ax.title.get_text()
        # the image is shown in pixel units, undoing the normalisation
        assert 0.0 <= ax.images[0].get_array().min() and ax.images[0].get_array().max() <= 1.0


def test_run_prediction_grid_is_a_figure_for_reports(gtsrb_run, shared_data, monkeypatch):
    monkeypatch.setenv("NUMEXP_DATA_ROOT", str(shared_data))
    fig = evaluate.run_prediction_grid(gtsrb_run, n=8)
    assert len([ax for ax in fig.axes if ax.images]) == 8 and str(gtsrb_run) in fig.get_suptitle()


# --------------------------------------------------------------------------- other data and splits

def test_other_data_options_are_renormalised_to_the_runs_statistics(gtsrb_run, shared_data, scored, monkeypatch):
    monkeypatch.setenv("NUMEXP_DATA_ROOT", str(shared_data))
    ev = evaluate.evaluate(gtsrb_run, ["data.fraction=0.1"])
    assert ev.overridden and ev.recorded is None and len(ev.y) > len(scored.y)
    assert ev.data_options["fraction"] == 0.1
    assert 0.3 < ev.accuracy < 0.8  # the same model on a larger sample of the same test set


def test_renormalize_equals_normalising_with_the_target_statistics():
    x = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4, 4)).astype(np.uint8)
    a_mean, a_std = np.array([0.3, 0.4, 0.5], np.float32), np.array([0.2, 0.25, 0.3], np.float32)
    b_mean, b_std = np.array([0.35, 0.3, 0.45], np.float32), np.array([0.27, 0.22, 0.31], np.float32)
    moved = evaluate.renormalize(normalize(x, a_mean, a_std, 1 / 255), a_mean, a_std, b_mean, b_std)
    np.testing.assert_allclose(moved, normalize(x, b_mean, b_std, 1 / 255), atol=1e-5)
    same = normalize(x, a_mean, a_std, 1 / 255)
    assert evaluate.renormalize(same, a_mean, a_std, a_mean.copy(), a_std.copy()) is same


def test_bad_overrides_data_and_split_are_one_line_errors(gtsrb_run, shared_data, monkeypatch, capsys):
    monkeypatch.setenv("NUMEXP_DATA_ROOT", str(shared_data))
    for args, words in [(["split=bogus"], "split=bogus is invalid"), (["lr=1"], "cannot override 'lr=1'"),
                        (["data=digits"], "data=digits gives inputs of shape (1, 8, 8)"),
                        (["data=nope"], "data=nope is not an option: data is one of")]:
        assert evaluate.main([str(gtsrb_run), *args]) == 1
        (line,) = capsys.readouterr().err.splitlines()
        assert words in line, (args, line)


def test_eval_on_the_validation_split_reproduces_val_acc(gtsrb_run, shared_data, monkeypatch):
    monkeypatch.setenv("NUMEXP_DATA_ROOT", str(shared_data))
    summary = json.loads((gtsrb_run / "summary.json").read_text())
    ev = evaluate.evaluate(gtsrb_run, split="val")
    assert len(ev.y) == summary["data"]["sizes"]["val"] and ev.accuracy == ev.recorded == summary["val_acc"]


def test_a_copy_with_an_svm_head_titles_its_mistakes_with_margins(gtsrb_run, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NUMEXP_DATA_ROOT", str(shared_data))
    run = predict.load_run(copy_run(gtsrb_run, tmp_path / "svm", **{"name: softmax": "name: svm_l2"}))
    ev = evaluate.evaluate(run)
    fig = evaluate.mistakes_figure(ev, n=4)
    assert "margin of the predicted class" in fig.get_suptitle()
    titles = [ax.title.get_text() for ax in fig.axes if ax.images]
    assert len(titles) == 4 and all(re.search(r" [+-]\d+\.\d\d\n", t) for t in titles), titles
