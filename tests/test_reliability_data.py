"""Bad data, end to end through ``python -m numexp``: a clear one-line error naming the file, exit
code 1, no traceback, the failure recorded in the run's summary.json; skip-and-count where
``data.skip_bad=true``; a corrupt cache is rebuilt, never trusted; oversized images are refused.

The loaders' own unit tests are in test_data.py; this file checks what a user sees.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli_env, run_cli_many
from numexp import data
from test_data import make_gtsrb, make_mnist, write_idx

# a small model for every data set: the runs that should succeed take a second
RUN = ["model=mlp", "model.hidden=[8]", "epochs=1"]


def image_folder(root, classes=3, per_class=6, seed=0):
    """``root/<class>/<i>.ppm``: small random RGB images. Returns root."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.ppm")
    return root


def bomb_ppm(path, side):
    """A PPM whose header claims side x side pixels, followed by a few bytes of data."""
    path.write_bytes(f"P6\n{side} {side}\n255\n".encode() + bytes(64))
    return path


def _bad_data_cases(base):
    """{case: (overrides, the path the message must name, a phrase it must contain)}."""
    cases = {}
    cases["missing root"] = (["data=mnist", f"data.root={base / 'nowhere'}"], base / "nowhere", "does not exist")

    make_mnist(base / "magic")
    write_idx(base / "magic" / "t10k-labels-idx1-ubyte", np.arange(30) % 10, magic=2051)
    cases["IDX wrong magic"] = (["data=mnist", f"data.root={base / 'magic'}"],
                                base / "magic" / "t10k-labels-idx1-ubyte", "magic number 2051, expected 2049")

    make_mnist(base / "short")
    short = base / "short" / "t10k-images-idx3-ubyte"
    short.write_bytes(short.read_bytes()[:-100])
    cases["IDX short payload"] = (["data=mnist", f"data.root={base / 'short'}"], short, "truncated")

    make_mnist(base / "count")
    write_idx(base / "count" / "t10k-labels-idx1-ubyte", np.arange(29) % 10)
    cases["labels and images differ in count"] = (["data=mnist", f"data.root={base / 'count'}"],
                                                  base / "count" / "t10k-images-idx3-ubyte", "30 images but")

    image_folder(base / "empty")
    (base / "empty" / "class9").mkdir()
    cases["empty class folder"] = (["data=image_folder", f"data.root={base / 'empty'}"], base / "empty" / "class9",
                                   "holds no image files")

    image_folder(base / "truncated")
    truncated = base / "truncated" / "class1" / "3.ppm"
    truncated.write_bytes(truncated.read_bytes()[:30])
    cases["truncated ppm"] = (["data=image_folder", f"data.root={base / 'truncated'}"], truncated, "skip_bad")

    image_folder(base / "text")
    text = base / "text" / "class2" / "0.ppm"
    text.write_text("this is not an image\n")
    cases["non-image ppm"] = (["data=image_folder", f"data.root={base / 'text'}"], text, "cannot read image file")

    make_gtsrb(base / "gtsrb")
    missing = base / "gtsrb" / "GTSRB" / "Final_Training" / "Images" / "00001" / "00002_00003.ppm"
    missing.unlink()
    cases["CSV row pointing at a missing file"] = (["data=gtsrb", f"data.root={base / 'gtsrb'}", "data.size=8",
                                                    f"data.cache_dir={base / 'cache'}"], missing, "does not exist")

    image_folder(base / "bomb")
    bomb = bomb_ppm(base / "bomb" / "class0" / "bomb.ppm", 100_000)
    cases["decompression bomb (10G pixels)"] = (["data=image_folder", f"data.root={base / 'bomb'}"], bomb,
                                                "exceeds")
    image_folder(base / "bomb2")
    bomb2 = bomb_ppm(base / "bomb2" / "class0" / "bomb.ppm", 10_000)
    cases["decompression bomb (100M pixels, between Pillow's warning and its error)"] = (
        ["data=image_folder", f"data.root={base / 'bomb2'}"], bomb2, "decompression bomb")

    (base / "cifar" / "cifar-10-batches-bin").mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        np.zeros((4, 3073), np.uint8).tofile(base / "cifar" / "cifar-10-batches-bin" / name)
    odd = base / "cifar" / "cifar-10-batches-bin" / "data_batch_3.bin"
    odd.write_bytes(odd.read_bytes()[:-7])
    cases["CIFAR-10 batch of the wrong length"] = (["data=cifar10", f"data.root={base / 'cifar'}"], odd,
                                                   "not a positive multiple")
    return cases


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-data")
    cases = _bad_data_cases(base)
    commands = [[*RUN, *overrides, f"hydra.run.dir={base / 'runs' / str(i)}"]
                for i, (overrides, _, _) in enumerate(cases.values())]
    results = run_cli_many(base, commands, env=cli_env(NUMEXP_CACHE_DIR=str(base / "cache")))
    return {case: (proc, base / "runs" / str(i), *cases[case][1:])
            for i, (case, proc) in enumerate(zip(cases, results))}


CASES = ["missing root", "IDX wrong magic", "IDX short payload", "labels and images differ in count",
         "empty class folder", "truncated ppm", "non-image ppm", "CSV row pointing at a missing file",
         "decompression bomb (10G pixels)", "decompression bomb (100M pixels, between Pillow's warning and its error)",
         "CIFAR-10 batch of the wrong length"]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_gives_one_line_naming_the_file(bad_data, case):
    proc, run_dir, path, phrase = bad_data[case]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert all(line.startswith("[") for line in lines), f"every line is one log record:\n{output}"
    (error,) = [line for line in lines if "[ERROR]" in line]
    assert "[numexp.trainer][ERROR] - failed: " in error and str(path) in error and phrase in error, error
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and str(path) in summary["error"]
    assert not (run_dir / "metrics.csv").exists(), "no training started"


def test_skip_bad_skips_and_counts_the_bad_files(run_cli, tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=8)
    (root / "class0" / "1.ppm").write_bytes((root / "class0" / "1.ppm").read_bytes()[:30])
    (root / "class2" / "5.ppm").write_text("not an image")
    bomb_ppm(root / "class1" / "bomb.ppm", 100_000)
    proc = run_cli(*RUN, "data=image_folder", f"data.root={root}", "data.skip_bad=true",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "run" / "numexp.log").read_text()
    (warning,) = [line for line in log.splitlines() if "[WARNING]" in line]
    assert "UserWarning: skipped 3 of" in warning and str(root / "class0" / "1.ppm") in warning
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["data"]["n_skipped"] == 3


def test_corrupt_cache_is_rebuilt_not_trusted_end_to_end(run_cli, tmp_path):
    root, cache = make_gtsrb(tmp_path / "data"), tmp_path / "cache"
    args = [*RUN, "data=gtsrb", f"data.root={root}", "data.size=8", f"data.cache_dir={cache}"]
    assert run_cli(*args, f"hydra.run.dir={tmp_path / 'first'}").returncode == 0
    (cache_file,) = cache.iterdir()
    good = cache_file.read_bytes()
    cache_file.write_bytes(good[:len(good) // 2])  # torn, as a non-atomic writer killed mid-write would leave it
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'second'}")
    assert proc.returncode == 0, proc.stderr
    assert "ignoring unusable cache" in (tmp_path / "second" / "numexp.log").read_text()
    assert cache_file.read_bytes() == good  # rebuilt byte for byte
    metrics = [(tmp_path / run / "metrics.csv").read_text().splitlines() for run in ("first", "second")]
    assert [r.rsplit(",", 1)[0] for r in metrics[0]] == [r.rsplit(",", 1)[0] for r in metrics[1]]
    # the run states where its data came from
    info = json.loads((tmp_path / "second" / "summary.json").read_text())["data"]
    assert info["cache_hit"] is False and Path(info["cache"]) == cache_file


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_decompression_bomb_limit_is_on_and_enforced_below_twice_the_limit(tmp_path):
    assert Image.MAX_IMAGE_PIXELS and Image.MAX_IMAGE_PIXELS <= 2 ** 28
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)  # Pillow alone only warns here
    with pytest.raises(data.DataError, match="decompression bomb") as err:
        data.transform_images(bomb_ppm(tmp_path / "big.ppm", side), 8, 3, np.zeros(3), np.ones(3))
    assert str(tmp_path / "big.ppm") in str(err.value)


def test_no_data_loader_turns_the_limit_off():
    sources = "".join(p.read_text() for p in Path(data.__file__).parent.glob("*.py"))
    assert "MAX_IMAGE_PIXELS = None" not in sources and "MAX_IMAGE_PIXELS=None" not in sources


def test_digits_are_read_without_importing_sklearn_but_equal_its_arrays():
    """Runs on digits start a second sooner; the arrays must stay scikit-learn's."""
    from sklearn.datasets import load_digits

    from numexp.data.digits import _read_digits

    images, target = _read_digits()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)


def test_a_cache_holding_a_pickled_object_is_rebuilt_and_never_unpickled(tmp_path):
    from numexp.data import cache
    from test_reliability_resume import Exploit

    path, meta = tmp_path / "c.npz", cache.cache_meta("test")
    np.savez(path, meta=np.array(meta), x=np.array([Exploit(str(tmp_path / "pwned"))], dtype=object))
    with pytest.warns(UserWarning, match="ignoring unusable cache .*pickle"):
        assert cache.load_cache(path, meta, lambda arrays: None) is None
    assert not (tmp_path / "pwned").exists()
