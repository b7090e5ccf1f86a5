"""The shipped conf/ composes, is typed, refuses misspelt keys and impossible values."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from numexp import config

CONF = Path(config.__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "data", "loss", "optim", "schedule"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_conf_ships_every_option_the_issue_lists():
    assert {(g, o) for g, o in OPTIONS} >= {
        *[("model", m) for m in ["simplenet", "simple_convnet", "lenet5", "mlp", "softmax_regression",
                                 "resnet_small"]],
        *[("data", d) for d in ["digits", "gtsrb", "mnist", "cifar10", "image_folder"]],
        *[("loss", x) for x in ["softmax", "svm_l1", "svm_l2"]],
        *[("optim", o) for o in ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"]],
        *[("schedule", s) for s in ["fixed", "dynamic", "step", "exp_decay", "cosine"]]}
    assert set(EXPERIMENTS) >= {"svm_vs_softmax", "reg_sweep", "lr_schedule", "lenet5_mnist", "optimizers"}


def test_default_config_is_valid_and_typed(compose_cfg):
    cfg = compose_cfg()
    config.validate(cfg)
    assert (cfg.model.name, cfg.data.name, cfg.loss.name) == ("resnet_small", "digits", "softmax")
    assert isinstance(OmegaConf.to_object(cfg), config.Config)


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_group_option_composes_and_validates(compose_cfg, group, option):
    extra = ["data.root=/some/images"] if option == "image_folder" else []
    cfg = compose_cfg([f"{group}={option}", *extra])
    assert cfg[group].name == option or group == "optim"  # momentum and nesterov are SGD options
    config.validate(cfg)


def test_reg_zero_on_the_command_line_becomes_a_float(compose_cfg):
    cfg = compose_cfg(["reg=0", "lr=1"])
    assert isinstance(cfg.reg, float) and isinstance(cfg.lr, float)


@pytest.mark.parametrize("override", ["lr_rate=0.1", "model.hiden=5", "lr=abc", "epochs=1.5",
                                      "model=simplnet", "optim=adam optim.momentum=0.9",
                                      "model=mlp model.activation=relux", "model.init=kaiming"])
def test_misspelt_key_wrong_type_or_option_fails_at_composition(compose_cfg, override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(override.split())


@pytest.mark.parametrize("overrides, key", [
    ("lr=0", "lr"), ("lr=-1", "lr"), ("epochs=0", "epochs"), ("batch_size=0", "batch_size"),
    ("reg=-1e-4", "reg"), ("threads=0", "threads"), ("patience=-1", "patience"),
    ("model=mlp model.dropout=1.0", "model.dropout"), ("model=mlp model.dropout=-0.1", "model.dropout"),
    ("model=mlp model.hidden=[]", "model.hidden"), ("data.fraction=0", "data.fraction"),
    ("data.val_fraction=0", "data.val_fraction"), ("schedule=step schedule.gamma=0", "schedule.gamma"),
    ("optim=adam optim.betas=[0.9,1.0]", "optim.betas"), ("augment.names=[rotate]", "augment.names"),
    ("+bogus=1", "bogus"), ("+model.hidden=[5]", "model.hidden"), ("data=image_folder", "data.root"),
])
def test_impossible_values_name_the_key(compose_cfg, overrides, key):
    cfg = compose_cfg(overrides.split())
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")) as err:
        config.validate(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_its_grid_and_documents_its_command(compose_cfg, name):
    assert compose_cfg([f"+experiment={name}"], hydra=True).hydra.sweeper.params, \
        "an experiment defines its grid in hydra.sweeper.params"
    lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1] == f"# python -m numexp -m +experiment={name}"
    config.validate(compose_cfg([f"+experiment={name}"]))


def test_seed_protocol_of_svm_vs_softmax(compose_cfg):
    cfg = compose_cfg(["+experiment=svm_vs_softmax"], hydra=True)
    assert (cfg.model.name, cfg.data.name, cfg.optim.name, cfg.optim.momentum) == ("simplenet", "gtsrb", "sgd", 0)
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.reg) == (1e-3, 64, 60, 0.0)
    assert (cfg.schedule.name, cfg.schedule.step_size, cfg.schedule.factor) == ("dynamic", 20, 10.0)
    assert set(cfg.hydra.sweeper.params.loss.split(",")) == {"svm_l2", "softmax"}


def test_hydra_settings(compose_cfg):
    h = OmegaConf.to_container(compose_cfg(hydra=True).hydra)  # unresolved: ${now:...} stays
    assert h["job"]["name"] == "numexp"
    assert "Joblib" in h["launcher"]["_target_"] and h["launcher"]["n_jobs"] == -1
    # microseconds in the folder names: two runs started in the same second never share one
    assert h["run"]["dir"] == "results/runs/${now:%Y-%m-%d}/${now:%H-%M-%S-%f}"
    assert h["sweep"]["dir"] == "results/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S-%f}"
    assert h["sweep"]["subdir"] == "${hydra.job.num}"
    assert h["callbacks"]["collect_runs"]["_target_"] == "numexp.callbacks.CollectRuns"
    assert h["callbacks"]["check_before_start"]["_target_"] == "numexp.callbacks.CheckBeforeStart"
    assert h["callbacks"]["start_workers"]["_target_"] == "numexp.workers.StartWorkers"


def test_data_root_defaults_to_the_environment(compose_cfg, monkeypatch):
    monkeypatch.setenv("NUMEXP_DATA_ROOT", "/elsewhere")
    assert compose_cfg(["data=gtsrb"]).data.root == "/elsewhere"
    monkeypatch.delenv("NUMEXP_DATA_ROOT")
    assert compose_cfg(["data=mnist"]).data.root == "data"
