"""state_dict -> .npz -> load_state_dict round trips, and bad files give clear errors."""
import numpy as np
import pytest

from numexp import models, nn

SHAPES = {"simplenet": (3, 32, 32), "simple_convnet": (1, 28, 28), "lenet5": (1, 28, 28),
          "mlp": (1, 8, 8), "softmax_regression": (1, 8, 8), "resnet_small": (3, 16, 16)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_state_dict_round_trips_through_npz_exactly(name, tmp_path):
    a = models.build(name, SHAPES[name], 10, rng=np.random.default_rng(0))
    b = models.build(name, SHAPES[name], 10, rng=np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((4,) + SHAPES[name]).astype(np.float32)
    a.train()(x)  # move BatchNorm running statistics away from their initial values
    path = tmp_path / "model.npz"
    nn.save_npz(path, a.state_dict())
    b.load_state_dict(nn.load_npz(path))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        np.testing.assert_array_equal(va, vb)
    a.eval(), b.eval()
    np.testing.assert_array_equal(a(x), b(x))


def test_state_dict_keys_are_torch_style_dotted_names():
    keys = list(models.build("simplenet", (3, 32, 32), 43).state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"]
    assert "bn1.running_var" in keys and "fc2.bias" in keys
    assert "conv1.bias" not in keys  # SimpleNet's convolutions have no bias


def test_missing_key_is_named(tmp_path):
    model = models.build("mlp", (1, 8, 8), 10)
    state = model.state_dict()
    del state["fc1.bias"]
    with pytest.raises(KeyError, match="fc1.bias"):
        model.load_state_dict(state)


def test_misshaped_array_names_key_and_both_shapes():
    model = models.build("mlp", (1, 8, 8), 10)
    state = model.state_dict()
    state["fc2.weight"] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"fc2\.weight.*\(3, 3\).*\(10, 100\)"):
        model.load_state_dict(state)


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"fc1.weight": np.array([object()], dtype=object)})
    with pytest.raises(nn.CheckpointError, match="pickle"):
        nn.load_npz(path)


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(nn.CheckpointError, match="not a valid"):
        nn.load_npz(path)
    with pytest.raises(nn.CheckpointError, match="does not exist"):
        nn.load_npz(tmp_path / "absent.npz")


def test_save_npz_leaves_no_temporary_files(tmp_path):
    nn.save_npz(tmp_path / "m.npz", {"a": np.zeros(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]
