"""`numexp predict`: a run trained on the shared GTSRB subset predicts real test images and folders."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from numexp import predict
from numexp.data import splits
from numexp.data.base import read_class_names

# a tiny GTSRB run: about 4 s of training on 1,014 images, about 50% test accuracy
TRAIN = ["data=gtsrb", "data.fraction=0.05", "epochs=3", "model=simple_convnet", "lr=1e-3", "schedule=fixed"]
NAMES = read_class_names("gtsrb_names.txt")


def train_gtsrb_run(base, data_root):
    """The tiny GTSRB run folder under ``base``, trained through ``python -m numexp`` on first use (the
    fixtures of every test module share it: one training per session)."""
    run = Path(base) / "gtsrb_run"
    if not (run / "summary.json").exists():
        if not (Path(data_root) / "GTSRB" / "Final_Test" / "Images").is_dir():
            pytest.skip(f"no GTSRB subset under {data_root} (see ../shared/data/README.md)")
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env["NUMEXP_DATA_ROOT"] = str(data_root)
        proc = subprocess.run([sys.executable, "-m", "numexp", *TRAIN, f"hydra.run.dir={run}"], cwd=base, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture(scope="session")
def gtsrb_run(tmp_path_factory, shared_data):
    return train_gtsrb_run(tmp_path_factory.getbasetemp(), shared_data)


@pytest.fixture
def data_root(shared_data, monkeypatch):
    """The run's config reads the data root from $NUMEXP_DATA_ROOT."""
    monkeypatch.setenv("NUMEXP_DATA_ROOT", str(shared_data))
    return shared_data


def gtsrb_test_images(shared_data):
    return shared_data / "GTSRB" / "Final_Test" / "Images"


def some_test_files(shared_data, n):
    """The first ``n`` files of the GTSRB test CSV (the shared subset leaves gaps in the numbering)."""
    return [gtsrb_test_images(shared_data) / name for name in list(ground_truth(shared_data))[:n]]


def ground_truth(shared_data):
    """{file name: ClassId} of the GTSRB test set, in CSV order."""
    with open(gtsrb_test_images(shared_data) / "GT-final_test.csv", newline="") as f:
        return {row["Filename"]: int(row["ClassId"]) for row in csv.DictReader(f, delimiter=";")}


def copy_run(run, dest, **edits):
    """A copy of the run folder whose .hydra/config.yaml has ``old: new`` line edits."""
    shutil.copytree(run, dest)
    config = dest / ".hydra" / "config.yaml"
    text = config.read_text()
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    config.write_text(text)
    return dest


def cli(*args, module="numexp.predict"):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


# --------------------------------------------------------------------------- real test images

def test_top_k_of_real_test_images_with_names_and_probabilities(gtsrb_run, shared_data, tmp_path, capsys):
    files = some_test_files(shared_data, 6)
    out = tmp_path / "predictions.csv"
    assert predict.main([str(gtsrb_run), *map(str, files), "--top-k", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "scores are softmax probabilities" in text and "predicted 6 images" in text
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert list(rows[0]) == ["path"] + [f"{c}_{i}" for i in range(1, 5) for c in ("label", "name", "score")] + \
        ["score_type"]
    for row in rows:
        labels = [int(row[f"label_{i}"]) for i in range(1, 5)]
        scores = [float(row[f"score_{i}"]) for i in range(1, 5)]
        assert len(set(labels)) == 4 and [row[f"name_{i}"] for i in range(1, 5)] == [NAMES[k] for k in labels]
        assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] and sum(scores) <= 1 + 1e-5
        assert row["score_type"] == "probability"
        assert f"1. {labels[0]} {NAMES[labels[0]]}" in text


def test_predicting_the_runs_test_files_reproduces_its_test_accuracy(gtsrb_run, shared_data):
    """The run's own test images, read from their .ppm files with the preprocessing recorded in
    summary.json, are classified exactly as in training: the same test accuracy, to the last bit."""
    summary = json.loads((gtsrb_run / "summary.json").read_text())
    truth = ground_truth(shared_data)
    names, labels = list(truth), np.array(list(truth.values()))
    # the loader's fixed-seed stratified test subset (data.fraction), in CSV order
    keep = splits.stratified_subset(labels, summary["data"]["options"]["fraction"], splits.test_subset_rng())
    assert len(keep) == summary["data"]["sizes"]["test"]
    run = predict.load_run(gtsrb_run)
    predictions, bad = predict.predict_files(run, [gtsrb_test_images(shared_data) / names[i] for i in keep], k=1)
    assert not bad and len(predictions) == len(keep)
    correct = sum(int(p.labels[0] == labels[i]) for p, i in zip(predictions, keep))
    assert correct / len(keep) == summary["test_acc"]


def test_png_copy_predicts_like_the_ppm_and_any_size_or_mode_is_accepted(gtsrb_run, shared_data, tmp_path):
    (source,) = some_test_files(shared_data, 1)
    rgb = Image.open(source).convert("RGB")
    rgb.save(tmp_path / "same.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "alpha.png")
    rgb.resize((97, 61)).save(tmp_path / "photo.jpg", quality=90)
    rgb.convert("L").save(tmp_path / "grey.bmp")
    rgb.convert("P").save(tmp_path / "palette.gif")
    run = predict.load_run(gtsrb_run)
    files = [source] + sorted(tmp_path.iterdir())
    predictions, bad = predict.predict_files(run, files, k=43)
    assert not bad and len(predictions) == 6
    by_name = {p.path.name: p for p in predictions}
    # lossless copies (alpha dropped) are the same pixels, so the same scores (up to the last bits: GEMM
    # blocking depends on an image's row in the batch)
    for name in ("same.png", "alpha.png"):
        assert np.array_equal(by_name[name].labels, by_name[source.name].labels)
        np.testing.assert_allclose(by_name[name].scores, by_name[source.name].scores, rtol=1e-5, atol=1e-9)
    for p in predictions:
        assert p.scores.sum() == pytest.approx(1.0, abs=1e-6) and sorted(p.labels) == list(range(43))


# --------------------------------------------------------------------------- bad input

def test_folder_with_a_corrupt_file_names_it_skips_it_and_counts_it(gtsrb_run, shared_data, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    files = some_test_files(shared_data, 3)
    for i, f in enumerate(files):
        shutil.copy(f, folder / ("sub" if i == 2 else ".") / f.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not a png" * 20)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "p.csv"
    proc = cli(gtsrb_run, folder, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"skipped {folder / 'broken.png'}: not readable as an image" in proc.stderr
    assert "predicted 3 images, skipped 1 (missing or not readable as an image); ignored 1 non-image file" \
        in proc.stdout
    assert sorted(Path(r["path"]).name for r in csv.DictReader(out.open())) == sorted(f.name for f in files)


def test_all_inputs_failing_exits_nonzero_naming_each(gtsrb_run, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    proc = cli(gtsrb_run, tmp_path / "a.jpg", tmp_path / "missing.png", tmp_path / "empty")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"skipped {tmp_path / 'a.jpg'}: not readable as an image" in proc.stderr
    assert f"skipped {tmp_path / 'missing.png'}: does not exist" in proc.stderr
    assert f"skipped {tmp_path / 'empty'}: folder holds no image files" in proc.stderr
    assert "skipped 3" in proc.stdout and "error: no image could be predicted" in proc.stderr


def test_checkpoint_that_does_not_fit_names_the_key_and_both_shapes(gtsrb_run, shared_data, tmp_path):
    run = copy_run(gtsrb_run, tmp_path / "run", **{"hidden: 100": "hidden: 64"})
    proc = cli(run, *some_test_files(shared_data, 1))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "'fc1.weight'" in line and "(100, 5880)" in line and "(64, 5880)" in line


def test_not_a_run_folder_is_one_line(tmp_path):
    proc = cli(tmp_path, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: {tmp_path} has no .hydra/config.yaml: RUN must be a run folder "
                                        f"written by numexp (or a checkpoint with its config beside it)"]


def test_svm_head_says_its_scores_are_margins(gtsrb_run, shared_data, tmp_path, capsys):
    run = copy_run(gtsrb_run, tmp_path / "run", **{"name: softmax": "name: svm_l2"})
    out = tmp_path / "p.csv"
    assert predict.main([str(run / "checkpoint.npz"), str(some_test_files(shared_data, 1)[0]),
                         "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SVM margins" in text and "not probabilities" in text and "softmax probabilities" not in text
    (row,) = csv.DictReader(out.open())
    assert row["score_type"] == "margin"
    assert sum(float(row[f"score_{i}"]) for i in range(1, 4)) != pytest.approx(1.0)


# --------------------------------------------------------------------------- both command forms

def test_console_script_runs_predict(gtsrb_run, shared_data):
    script = Path(sys.executable).with_name("numexp")
    proc = subprocess.run([str(script), "predict", str(gtsrb_run), str(some_test_files(shared_data, 1)[0]),
                           "--top-k", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "top 1 of 43 classes" in proc.stdout and "predicted 1 image" in proc.stdout


# --------------------------------------------------------------------------- helpers

def test_top_k_and_softmax():
    scores = np.array([[1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1000.0]], dtype=np.float32)
    labels, top = predict.top_k(scores, 3)
    assert labels.tolist() == [[1, 3, 2], [3, 0, 1]] and top[0].tolist() == [3.0, 3.0, 2.0]
    p = predict.softmax(scores)
    assert np.allclose(p.sum(axis=1), 1.0) and np.isfinite(p).all() and p[1, 3] == pytest.approx(1.0)
    assert predict.top_k(scores, 10)[0].shape == (2, 4)


def test_class_names_ship_with_the_package():
    assert predict.class_names({"data": {"dataset": "digits"}}, 10) == [str(d) for d in range(10)]
    assert predict.class_names({"data": {"dataset": "mnist"}}, 10)[9] == "9"
    assert predict.class_names({"data": {"dataset": "cifar10"}}, 10)[0] == "airplane"
    assert predict.class_names({"data": {"dataset": "gtsrb"}}, 43)[14] == "Stop"
    assert predict.class_names({}, 3) == ["0", "1", "2"]
