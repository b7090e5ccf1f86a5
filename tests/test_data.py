"""numexp.data: loaders (synthetic trees in tmp_path, real shared data), batching, augmentation.

Real-data tests read ``$NUMEXP_DATA_ROOT`` (CI: ../shared/data) and skip without it.
"""
import gzip
import json
import os
from pathlib import Path
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from numexp import data

GTSRB_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep every test's caches out of ~/.cache."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "default-cache"))


def real_root(subfolder):
    """The shared data root, or skip when it (or its ``subfolder``) is absent."""
    root = os.environ.get(data.ROOT_ENV)
    if not root:
        pytest.skip(f"{data.ROOT_ENV} is not set (e.g. {data.ROOT_ENV}=../shared/data): no real data")
    if not (Path(root) / subfolder).is_dir():
        pytest.skip(f"{Path(root) / subfolder} does not exist")
    return Path(root)


def unnormalize(x, ds):
    """Back to [0, 1] pixel units. Shape: (N, C, H, W) -> same."""
    return x * ds.std[:, None, None] + ds.mean[:, None, None]


# --------------------------------------------------------------------------- digits

def test_digits_shapes_dtypes_and_class_names():
    ds = data.load("digits")
    assert ds.in_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.class_names == [str(d) for d in range(10)]
    for x, y in [(ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)]:
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0] > 0
    assert len(ds.y_train) + len(ds.y_val) + len(ds.y_test) == 1797
    assert len(ds.y_test) == round(0.2 * 1797)
    assert ds.mean.shape == ds.std.shape == (1,) and ds.mean.dtype == np.float32
    assert json.loads(json.dumps(ds.info))["sizes"]["test"] == len(ds.y_test)  # plain values only


def test_digits_train_split_is_normalised_per_channel():
    ds = data.load("digits")
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    pixels = unnormalize(ds.x_train, ds)  # values / 16 lie in [0, 1]
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5


def test_digits_same_seed_gives_identical_splits():
    a, b = data.load("digits", seed=3), data.load("digits", seed=3)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "mean", "std"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_digits_other_seed_changes_validation_but_not_test():
    a, b = data.load("digits", seed=0), data.load("digits", seed=1)
    assert not np.array_equal(a.y_val, b.y_val) or not np.array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    np.testing.assert_allclose(unnormalize(a.x_test, a), unnormalize(b.x_test, b), atol=1e-6)


def test_digits_fraction_keeps_a_stratified_share_of_every_class():
    full, part = data.load("digits"), data.load("digits", fraction=0.25)
    n_full = len(full.y_train) + len(full.y_val)
    n_part = len(part.y_train) + len(part.y_val)
    assert abs(n_part - 0.25 * n_full) <= 10
    assert abs(len(part.y_test) - 0.25 * len(full.y_test)) <= 10
    assert set(part.y_train) == set(range(10)) and set(part.y_test) == set(range(10))


def test_digits_size_28_upsamples_to_28x28():
    ds = data.load("digits", size=28)
    assert ds.in_shape == (1, 28, 28) and ds.x_test.shape[1:] == (1, 28, 28)
    np.testing.assert_allclose(ds.x_train.mean(), 0.0, atol=1e-5)


def test_val_fraction_zero_gives_empty_validation_arrays_of_the_right_shape():
    ds = data.load("digits", val_fraction=0)
    assert ds.x_val.shape == (0, 1, 8, 8) and ds.x_val.dtype == np.float32
    assert ds.y_val.shape == (0,) and ds.y_val.dtype == np.int64


@pytest.mark.parametrize("name, options, match", [
    ("nope", {}, "unknown data set"),
    ("digits", {"colour": 1}, "unknown option 'colour'"),
    ("digits", {"fraction": 0}, "fraction"),
    ("digits", {"val_fraction": 1.0}, "val_fraction"),
    ("digits", {"size": -3}, "size"),
    ("digits", {"seed": "abc"}, "seed"),
    ("digits", {"fraction": "half"}, "fraction"),
])
def test_load_rejects_unknown_names_options_and_impossible_values(name, options, match):
    with pytest.raises(data.DataError, match=match):
        data.load(name, **options)


# --------------------------------------------------------------------------- batches and augmentation

def test_batches_cover_every_sample_exactly_once_per_epoch():
    x = np.arange(103, dtype=np.float32).reshape(103, 1, 1, 1)
    y = np.arange(103)
    rng = np.random.default_rng(0)
    for _ in range(2):
        seen = [(xb.ravel(), yb) for xb, yb in data.batches(x, y, 10, rng)]
        xs = np.concatenate([s[0] for s in seen])
        ys = np.concatenate([s[1] for s in seen])
        np.testing.assert_array_equal(np.sort(ys), y)
        np.testing.assert_array_equal(xs, ys)  # x and y stay paired
        assert [len(s[1]) for s in seen] == [10] * 10 + [3]


def test_batches_same_generator_seed_reproduces_and_epochs_differ():
    x, y = np.zeros((50, 1, 2, 2), np.float32), np.arange(50)
    orders = lambda seed: [np.concatenate([yb for _, yb in data.batches(x, y, 8, rng)])
                           for rng in [np.random.default_rng(seed)] for _ in range(2)]
    first, second = orders(7), orders(7)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], first[1])


def test_batches_drop_last_skips_the_incomplete_batch():
    x, y = np.zeros((25, 3)), np.arange(25)
    sizes = [len(yb) for _, yb in data.batches(x, y, 10, np.random.default_rng(0), drop_last=True)]
    assert sizes == [10, 10]


def test_batches_without_shuffle_keep_order_and_return_copies():
    x, y = np.arange(12.0).reshape(6, 2), np.arange(6)
    got = list(data.batches(x, y, 4, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in got]), y)
    got[0][0][:] = -1
    assert x.min() == 0


@pytest.mark.parametrize("augment", [data.RandomCrop(4), data.RandomHorizontalFlip(),
                                     data.make_augment(["crop", "flip"], padding=2)])
def test_augmenters_keep_batch_shape_and_dtype(augment):
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    y = np.arange(20)
    for xb, yb in data.batches(x, y, 6, np.random.default_rng(1), augment=augment):
        assert xb.shape == (len(yb), 3, 8, 8) and xb.dtype == np.float32


def test_random_crop_with_padding_0_is_identity():
    x = np.random.default_rng(0).standard_normal((5, 3, 6, 7)).astype(np.float32)
    out = data.RandomCrop(0)(x, np.random.default_rng(0))
    np.testing.assert_array_equal(out, x)
    assert out is not x


def test_random_crop_returns_a_window_of_the_zero_padded_image():
    n, p = 16, 2
    x = (1 + np.arange(n * 2 * 5 * 5, dtype=np.float32)).reshape(n, 2, 5, 5)
    out = data.RandomCrop(p)(x, np.random.default_rng(3))
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    for i in range(n):
        windows = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        assert any(np.array_equal(out[i], w) for w in windows)
    assert not np.array_equal(out, x)


def test_horizontal_flip_mirrors_with_p1_and_keeps_with_p0():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 6)).astype(np.float32)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(data.RandomHorizontalFlip(1.0)(x, rng), x[..., ::-1])
    np.testing.assert_array_equal(data.RandomHorizontalFlip(0.0)(x, rng), x)


def test_make_augment_builds_none_for_no_names_and_rejects_unknown_ones():
    assert data.make_augment([]) is None
    with pytest.raises(ValueError, match="rotate"):
        data.make_augment(["rotate"])


# --------------------------------------------------------------------------- GTSRB, synthetic tree

def _save_noise(path, size, rng):
    w, h = size
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def make_gtsrb(root, classes=3, tracks=3, frames=4, test_per_class=4, seed=0):
    """Official-layout GTSRB tree with random PPMs of varying size. Returns root."""
    rng = np.random.default_rng(seed)
    base = root / "GTSRB"
    for c in range(classes):
        folder = base / "Final_Training" / "Images" / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = [GTSRB_HEADER]
        for t in range(tracks):
            for f in range(frames):
                name, size = f"{t:05d}_{f:05d}.ppm", (30 + f, 33)
                _save_noise(folder / name, size, rng)
                rows.append(f"{name};{size[0]};{size[1]};1;1;{size[0] - 1};{size[1] - 1};{c}")
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    test = base / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = [GTSRB_HEADER]
    for i in range(classes * test_per_class):
        _save_noise(test / f"{i:05d}.ppm", (36, 35), rng)
        rows.append(f"{i:05d}.ppm;36;35;1;1;35;34;{i % classes}")
    (test / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def gtsrb_tree(tmp_path):
    return make_gtsrb(tmp_path / "data")


def test_gtsrb_synthetic_loads_with_tracks_kept_whole(gtsrb_tree, tmp_path):
    ds = data.load("gtsrb", root=gtsrb_tree, cache_dir=tmp_path / "cache")
    assert ds.in_shape == (3, 32, 32) and ds.num_classes == 43
    assert len(ds.y_train) + len(ds.y_val) == 36 and len(ds.y_test) == 12
    assert len(ds.y_val) == 12  # round(0.2 * 3) = 1 of 3 tracks per class
    assert not set(map(tuple, ds.groups_train)) & set(map(tuple, ds.groups_val))
    assert json.loads(json.dumps(ds.info))["cache_hit"] is False
    # root may also point at the GTSRB folder itself
    same = data.load("gtsrb", root=gtsrb_tree / "GTSRB", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(same.x_train, ds.x_train)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong arrays"])
def test_gtsrb_unusable_cache_is_rebuilt_with_a_warning(gtsrb_tree, tmp_path, damage):
    cache_dir = tmp_path / "cache"
    first = data.load("gtsrb", root=gtsrb_tree, cache_dir=cache_dir)
    path = Path(first.info["cache"])
    assert path.is_file() and not first.info["cache_hit"]
    if damage == "garbage":
        path.write_bytes(b"not an npz file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        with np.load(path) as npz:
            arrays = dict(npz)
        arrays["x_train"] = arrays["x_train"][:, :, :5]
        np.savez(path.with_suffix(".tmp.npz"), **arrays)
        os.replace(path.with_suffix(".tmp.npz"), path)
    with pytest.warns(UserWarning, match="unusable cache"):
        rebuilt = data.load("gtsrb", root=gtsrb_tree, cache_dir=cache_dir)
    assert not rebuilt.info["cache_hit"]
    np.testing.assert_array_equal(rebuilt.x_train, first.x_train)
    np.testing.assert_array_equal(rebuilt.y_test, first.y_test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.load("gtsrb", root=gtsrb_tree, cache_dir=cache_dir).info["cache_hit"]


def test_gtsrb_cache_is_rebuilt_when_an_annotation_csv_changes(gtsrb_tree, tmp_path):
    cache_dir = tmp_path / "cache"
    first = data.load("gtsrb", root=gtsrb_tree, cache_dir=cache_dir)
    csv = gtsrb_tree / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")  # drop the last test image
    with pytest.warns(UserWarning, match="unusable cache"):
        ds = data.load("gtsrb", root=gtsrb_tree, cache_dir=cache_dir)
    assert len(ds.y_test) == len(first.y_test) - 1


def test_gtsrb_concurrent_builders_leave_one_valid_cache(gtsrb_tree, tmp_path):
    cache_dir = tmp_path / "cache"
    results = [None, None]

    def build(i):
        results[i] = data.load("gtsrb", root=gtsrb_tree, cache_dir=cache_dir)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in cache_dir.iterdir()] == [Path(results[0].info["cache"]).name]
    np.testing.assert_array_equal(results[0].x_train, results[1].x_train)
    assert data.load("gtsrb", root=gtsrb_tree, cache_dir=cache_dir).info["cache_hit"]


def test_gtsrb_transform_images_matches_the_training_pipeline(gtsrb_tree, tmp_path):
    cache_dir = tmp_path / "cache"
    data.load("gtsrb", root=gtsrb_tree, cache_dir=cache_dir)
    ds = data.load("gtsrb", root=gtsrb_tree, cache_dir=cache_dir)  # from the cache
    assert ds.info["cache_hit"]
    files = [gtsrb_tree / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm" for i in (0, 5)]
    x = data.transform_images(files, size=32, channels=3, mean=ds.mean, std=ds.std)
    np.testing.assert_array_equal(x, ds.x_test[[0, 5]])
    np.testing.assert_array_equal(ds.transform(Image.open(files[1])), ds.x_test[[5]])
    np.testing.assert_array_equal(ds.transform(np.asarray(Image.open(files[1]))), ds.x_test[[5]])


def test_gtsrb_missing_root_names_the_path_and_the_env_var(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataError, match="NUMEXP_DATA_ROOT") as err:
        data.load("gtsrb", root=missing)
    assert str(missing) in str(err.value) and "data.root" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="Final_Training") as err:
        data.load("gtsrb", root=tmp_path / "empty")
    assert str(tmp_path / "empty" / "GTSRB") in str(err.value)


def test_gtsrb_csv_row_pointing_at_a_missing_file_names_it(gtsrb_tree, tmp_path):
    victim = gtsrb_tree / "GTSRB" / "Final_Training" / "Images" / "00001" / "00002_00003.ppm"
    victim.unlink()
    with pytest.raises(data.DataError, match="does not exist") as err:
        data.load("gtsrb", root=gtsrb_tree, cache_dir=tmp_path / "cache")
    assert str(victim) in str(err.value)


def test_gtsrb_truncated_ppm_names_the_file(gtsrb_tree, tmp_path):
    victim = gtsrb_tree / "GTSRB" / "Final_Test" / "Images" / "00004.ppm"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(data.DataError) as err:
        data.load("gtsrb", root=gtsrb_tree, cache_dir=tmp_path / "cache")
    assert str(victim) in str(err.value) and "skip_bad" in str(err.value)


def test_gtsrb_skip_bad_skips_and_counts_bad_files(gtsrb_tree, tmp_path):
    images = gtsrb_tree / "GTSRB" / "Final_Training" / "Images"
    truncated = images / "00000" / "00000_00001.ppm"
    truncated.write_bytes(truncated.read_bytes()[:100])
    (images / "00002" / "00001_00000.ppm").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 2 of 36 bad image files") as record:
        ds = data.load("gtsrb", root=gtsrb_tree, cache_dir=tmp_path / "cache", skip_bad=True)
    assert str(truncated) in str(record[0].message)
    assert len(ds.y_train) + len(ds.y_val) == 34 and ds.info["n_skipped"] == 2


# --------------------------------------------------------------------------- GTSRB, real shared data

@pytest.fixture(scope="module")
def gtsrb_real(tmp_path_factory):
    """The real GTSRB subset, loaded once per session (several seconds) into a fresh cache."""
    root = real_root("GTSRB")
    cache_dir = tmp_path_factory.mktemp("gtsrb-real-cache")
    return data.load("gtsrb", root=root, cache_dir=cache_dir), root, cache_dir


def test_gtsrb_real_shapes_classes_and_split_sizes(gtsrb_real):
    ds, _, _ = gtsrb_real
    assert ds.in_shape == (3, 32, 32) and ds.num_classes == 43
    assert ds.class_names[0] == "Speed limit (20km/h)" and ds.class_names[42].startswith("End of no passing")
    assert len(ds.y_train) + len(ds.y_val) == 25087 and len(ds.y_test) == 7949
    assert set(ds.y_train) == set(ds.y_val) == set(ds.y_test) == set(range(43))
    assert 0.15 < len(ds.y_val) / 25087 < 0.25
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)


def test_gtsrb_real_no_track_is_in_both_train_and_val(gtsrb_real):
    ds, _, _ = gtsrb_real
    train_tracks = set(map(tuple, ds.groups_train))
    val_tracks = set(map(tuple, ds.groups_val))
    assert val_tracks and not train_tracks & val_tracks
    np.testing.assert_array_equal(ds.groups_val[:, 0], ds.y_val)


def test_gtsrb_real_cache_is_created_and_second_load_is_identical(gtsrb_real):
    # no timing here: a unit test that times a disk read fails whenever the page cache is cold or CI is busy
    first, root, cache_dir = gtsrb_real
    assert not first.info["cache_hit"]
    assert [p.suffix for p in cache_dir.iterdir()] == [".npz"]
    second = data.load("gtsrb", root=root, cache_dir=cache_dir)
    assert second.info["cache_hit"]
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "mean", "std"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))


# --------------------------------------------------------------------------- MNIST

def write_idx(path, array, magic=None):
    """IDX file of uint8 ``array`` (gzipped if the name ends in .gz)."""
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_mnist(folder, n_train=60, n_test=30, seed=0):
    """train pair gzipped, t10k pair plain. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n, ext in (("train", n_train, ".gz"), ("t10k", n_test, "")):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", y)
        arrays[prefix] = (x, y)
    return arrays


def test_mnist_real_t10k_only_gives_fixed_8000_2000_split(tmp_path):
    root = real_root("MNIST")
    ds = data.load("mnist", root=root)
    assert ds.in_shape == (1, 28, 28) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_val) == 8000 and len(ds.y_test) == 2000
    assert set(ds.y_train) == set(ds.y_test) == set(range(10))
    with gzip.open(root / "MNIST" / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    np.testing.assert_array_equal(ds.y_test, labels[8000:])
    assert "8000" in ds.info["split"]


def test_mnist_reads_gz_and_plain_idx_files(tmp_path):
    arrays = make_mnist(tmp_path / "MNIST")
    ds = data.load("mnist", root=tmp_path, val_fraction=0)
    np.testing.assert_array_equal(ds.y_train, arrays["train"][1])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])
    np.testing.assert_allclose(unnormalize(ds.x_test, ds)[:, 0] * 255, arrays["t10k"][0], atol=1e-3)


def test_mnist_wrong_magic_names_the_file(tmp_path):
    make_mnist(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(bad, np.arange(30) % 10, magic=2051)
    with pytest.raises(data.DataError, match="magic number 2051, expected 2049") as err:
        data.load("mnist", root=tmp_path)
    assert str(bad) in str(err.value)


def test_mnist_short_payload_is_an_error_naming_the_file(tmp_path):
    make_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-100]))
    with pytest.raises(data.DataError, match="truncated") as err:
        data.load("mnist", root=tmp_path)
    assert str(bad) in str(err.value)


def test_mnist_image_label_count_mismatch_names_both_files(tmp_path):
    make_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(29) % 10)
    with pytest.raises(data.DataError, match="30 images but .* 29 labels") as err:
        data.load("mnist", root=tmp_path)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(err.value)


def test_mnist_missing_files_error_says_where_it_looked(tmp_path):
    with pytest.raises(data.DataError, match="IDX files") as err:
        data.load("mnist", root=tmp_path)
    assert str(tmp_path / "MNIST") in str(err.value) and "NUMEXP_DATA_ROOT" in str(err.value)


# --------------------------------------------------------------------------- CIFAR-10

def test_cifar10_binary_batches_round_trip_labels_and_pixels(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        y = rng.integers(0, 10, 12, dtype=np.uint8)
        x = rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
        np.concatenate([y[:, None], x.reshape(12, -1)], axis=1).tofile(folder / name)
        written[name] = (x, y)
    ds = data.load("cifar10", root=tmp_path, val_fraction=0)
    x_train = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    y_train = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_allclose(unnormalize(ds.x_train, ds) * 255, x_train, atol=1e-3)
    np.testing.assert_array_equal(ds.y_test, written["test_batch.bin"][1])
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10 and ds.in_shape == (3, 32, 32)


def test_cifar10_missing_data_asks_for_the_binary_version(tmp_path):
    with pytest.raises(data.DataError, match="BINARY version") as err:
        data.load("cifar10", root=tmp_path)
    assert "never unpickles" in str(err.value)


# --------------------------------------------------------------------------- image_folder

def make_image_folder(root):
    """Two classes of mixed formats, sizes and modes (RGB png, jpg, L png, RGBA png)."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    _save_noise(root / "cat" / "a.png", (40, 30), rng)
    _save_noise(root / "cat" / "b.jpg", (20, 20), rng)
    Image.fromarray(rng.integers(0, 256, (17, 23), dtype=np.uint8), "L").save(root / "cat" / "c.png")
    Image.fromarray(rng.integers(0, 256, (25, 25, 4), dtype=np.uint8), "RGBA").save(root / "dog" / "d.png")
    _save_noise(root / "dog" / "e.jpeg", (64, 48), rng)
    _save_noise(root / "dog" / "f.png", (16, 16), rng)
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_image_folder_loads_mixed_formats_sizes_and_modes(tmp_path):
    make_image_folder(tmp_path / "imgs")
    ds = data.load("image_folder", root=tmp_path / "imgs", size=16, test_fraction=0.34, val_fraction=0)
    assert ds.class_names == ["cat", "dog"] and ds.in_shape == (3, 16, 16)
    assert len(ds.y_train) + len(ds.y_test) == 6 and set(ds.y_test) == {0, 1}
    grey = data.load("image_folder", root=tmp_path / "imgs", size=8, channels=1, test_fraction=0.34)
    assert grey.in_shape == (1, 8, 8)


def test_image_folder_native_size_must_be_common(tmp_path):
    make_image_folder(tmp_path / "imgs")
    with pytest.raises(data.DataError, match="pass size=N"):
        data.load("image_folder", root=tmp_path / "imgs", size=None)


def test_image_folder_empty_class_folder_is_an_error_naming_it(tmp_path):
    make_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "emu").mkdir()
    with pytest.raises(data.DataError, match="holds no image files") as err:
        data.load("image_folder", root=tmp_path / "imgs")
    assert str(tmp_path / "imgs" / "emu") in str(err.value)


def test_image_folder_transform_images_matches_the_training_pipeline(tmp_path):
    make_image_folder(tmp_path / "split" / "train")
    make_image_folder(tmp_path / "split" / "test")
    ds = data.load("image_folder", root=tmp_path / "split", size=16, val_fraction=0)
    files = sorted((tmp_path / "split" / "train").glob("*/*.*"))
    files = [f for f in files if f.suffix != ".txt"]
    x = data.transform_images(files, size=16, channels=3, mean=ds.mean, std=ds.std)
    np.testing.assert_array_equal(x, ds.x_train)
    assert len(ds.y_test) == 6


def test_transform_images_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    with pytest.raises(data.DataError) as err:
        data.transform_images(bad, 8, 3, np.zeros(3), np.ones(3))
    assert str(bad) in str(err.value)
