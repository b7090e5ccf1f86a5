"""Bad configuration, for real through ``python -m numexp``: every case exits with code 2 before
Hydra creates a run folder, printing one line that names the key and what is allowed."""
import pytest

from conftest import run_cli_many
from numexp import config, data

# (overrides, text the one line must contain: the key, and the allowed values where there is a list)
CASES = {
    "unknown key": (["lr_rate=1"], ["unknown key lr_rate", "valid keys are model, data,"]),
    "unknown key added with +": (["+bogus=1"], ["unknown key bogus", "valid keys are"]),
    "unknown nested key": (["model=mlp", "model.hiden=[5]"], ["unknown key model.hiden", "in model are",
                                                              "hidden"]),
    "misspelt group option": (["model=simplnet"], ["model=simplnet is not an option",
                                                   "lenet5, mlp, resnet_small, simple_convnet, simplenet"]),
    "misspelt experiment": (["+experiment=reg_swep"], ["experiment=reg_swep is not an option", "reg_sweep"]),
    "misspelt choice": (["model=mlp", "model.activation=relux"],
                        ["model.activation=relux is invalid", "[relu, sigmoid, tanh]"]),
    "wrong type (float)": (["lr=abc"], ["lr=abc is invalid: must be a number"]),
    "wrong type (int)": (["epochs=1.5"], ["epochs=1.5 is invalid: must be an integer"]),
    "null for a number": (["reg=null"], ["reg cannot be null"]),
    "removed key": (["~lr"], ["lr is required"]),
    "lr = 0": (["lr=0"], ["lr=0.0 is invalid: must be > 0"]),
    "lr < 0": (["lr=-1e-3"], ["lr=-0.001 is invalid: must be > 0"]),
    "epochs < 1": (["epochs=0"], ["epochs=0 is invalid: must be >= 1"]),
    "batch_size < 1": (["batch_size=0"], ["batch_size=0 is invalid: must be >= 1"]),
    "reg < 0": (["reg=-1e-4"], ["reg=-0.0001 is invalid: must be >= 0"]),
    "dropout = 1": (["model=mlp", "model.dropout=1"], ["model.dropout=1.0 is invalid: must be in [0, 1)"]),
    "dropout < 0": (["model=mlp", "model.dropout=-0.1"], ["model.dropout=-0.1 is invalid: must be in [0, 1)"]),
    "model too deep for 8x8 digits": (["model=lenet5"], ["model=lenet5 does not fit data=digits (input (1, 8, 8))",
                                                         "Pick another model or data.size"]),
    "model too deep for a resized input": (["model=simple_convnet", "data.size=4"],
                                           ["model=simple_convnet does not fit data=digits (input (1, 4, 4))"]),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case run once, two at a time (each is a fresh interpreter: about a second)."""
    cwd = tmp_path_factory.mktemp("bad-config")
    results = run_cli_many(cwd, [overrides for overrides, _ in CASES.values()])
    return cwd, dict(zip(CASES, results))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_exits_2_with_one_line_naming_the_key(outcomes, case):
    _, results = outcomes
    proc, expected = results[case], CASES[case][1]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("numexp: error: "), proc.stderr
    for text in expected:
        assert text in lines[0]


def test_bad_config_creates_no_run_folder(outcomes):
    cwd, _ = outcomes
    assert not (cwd / "results").exists()


def test_expected_input_shape_matches_what_the_loaders_produce():
    """The model check before the run relies on these shapes; a wrong one would refuse good configs."""
    for size in (None, 12):
        ds = data.load("digits", size=size)
        assert config.expected_in_shape(_data_cfg("digits", size=size)) == ds.in_shape
    assert config.expected_in_shape(_data_cfg("mnist")) == (1, 28, 28)
    assert config.expected_in_shape(_data_cfg("cifar10")) == (3, 32, 32)
    assert config.expected_in_shape(_data_cfg("gtsrb", size=32)) == (3, 32, 32)
    assert config.expected_in_shape(_data_cfg("gtsrb")) is None  # native sizes vary: checked after loading
    assert config.expected_in_shape(_data_cfg("image_folder", size=16, channels=1)) == (1, 16, 16)


def test_expected_mnist_shape_matches_the_shared_data(shared_data):
    ds = data.load("mnist", root=shared_data, fraction=0.05)
    assert config.expected_in_shape(_data_cfg("mnist")) == ds.in_shape


def test_a_bad_value_in_one_job_of_a_sweep_fails_that_run_only(compose_cfg, tmp_path):
    """In a multirun each job validates its own values: the run is recorded as failed, no training."""
    from numexp import trainer

    summary = trainer.train(compose_cfg(["model=mlp", "lr=-1", "epochs=1"]), out_dir=tmp_path)
    assert summary["status"] == "failed" and summary["error"] == "lr=-1.0 is invalid: must be > 0"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "git.diff") == ["status.json", "summary.json"]


def _data_cfg(name, **options):
    from omegaconf import OmegaConf

    return OmegaConf.create({"name": name, "size": None, "channels": 3, **options})
