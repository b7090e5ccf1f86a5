"""Typed config schemas (Hydra ConfigStore) and the value checks run before training.

Each group option in ``conf/<group>/<option>.yaml`` lists its schema (``base_<option>``, or
``base_<group>`` when the group's options share one; stored under ``schema/<group>``) in its
defaults, so a misspelt key, a value of the wrong type or an unknown choice (Enum fields) fails
at composition, in Hydra's words. :func:`validate` then checks what a type cannot express
(``lr > 0``, ``dropout`` in [0, 1), keys added with ``+key=...``).

Keys are the keyword arguments of the component they configure (``models.build``,
``optim.build``, ``data.load``, the schedule classes), so config keys = constructor args =
runs-table columns.
"""
import copy
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException
from omegaconf import MISSING, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from numexp import models
from numexp.data.batching import AUGMENTERS


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what is allowed."""


# --------------------------------------------------------------------------- model

# Choices as Enums: composition then refuses any other value and lists the allowed ones
Init = Enum("Init", {name: name for name in ["he", "xavier", "normal", "torch"]})
Activation = Enum("Activation", {name: name for name in ["relu", "sigmoid", "tanh"]})
Pool = Enum("Pool", {name: name for name in ["avg", "max"]})


@dataclass
class ModelConfig:
    # registry name in numexp.models.MODELS
    name: str = MISSING
    # weight init: he, xavier, normal, torch; null = the model's own default
    init: Optional[Init] = None
    # standard deviation for init=normal
    init_std: float = 0.01


@dataclass
class SimplenetConfig(ModelConfig):
    pass


@dataclass
class SimpleConvnetConfig(ModelConfig):
    # conv1 output channels
    filters: int = 30
    # width of the hidden Linear layer
    hidden: int = 100


@dataclass
class Lenet5Config(ModelConfig):
    # sigmoid (classic), relu or tanh
    activation: Activation = Activation.sigmoid
    # avg (classic) or max
    pool: Pool = Pool.avg
    # conv1 padding; null = 2 on 28x28 inputs, else 0
    padding: Optional[int] = None


@dataclass
class MLPConfig(ModelConfig):
    # widths of the hidden layers
    hidden: List[int] = field(default_factory=lambda: [100])
    # relu, sigmoid or tanh
    activation: Activation = Activation.relu
    # drop probability after each hidden activation, in [0, 1)
    dropout: float = 0.0


@dataclass
class SoftmaxRegressionConfig(ModelConfig):
    pass


@dataclass
class ResnetSmallConfig(ModelConfig):
    # stem channels (doubled in the second residual block)
    channels: int = 16


# --------------------------------------------------------------------------- data

@dataclass
class DataConfig:
    # registry name in numexp.data.DATASETS
    name: str = MISSING
    # folder holding the data set (or its parent); null = $NUMEXP_DATA_ROOT; digits needs none
    root: Optional[str] = None
    # share of the training set held out for validation (best-model selection), in (0, 1)
    val_fraction: float = 0.1
    # seed of the validation split and of the `fraction` subset (not the run seed: seeds share a split)
    seed: int = 0
    # stratified share of train and test kept, in (0, 1]: shrink for quick runs
    fraction: float = 1.0
    # resize images to size x size; null = native size
    size: Optional[int] = None


@dataclass
class DigitsConfig(DataConfig):
    # share of the images held out as the test set (digits has no official split)
    test_fraction: float = 0.2


@dataclass
class GtsrbConfig(DataConfig):
    size: Optional[int] = 32
    # skip unreadable image files (counted, with a warning) instead of failing
    skip_bad: bool = False
    # decoded-image cache folder; null = $NUMEXP_CACHE_DIR or ~/.cache/numexp
    cache_dir: Optional[str] = None
    use_cache: bool = True


@dataclass
class ImageFolderConfig(DataConfig):
    # required (checked by validate): the folder of class folders, not $NUMEXP_DATA_ROOT
    root: Optional[str] = None
    size: Optional[int] = 32
    # 3 (RGB) or 1 (grey)
    channels: int = 3
    # share of the images held out as the test set (unless root has train/ and test/)
    test_fraction: float = 0.2
    # skip unreadable image files (counted, with a warning) instead of failing
    skip_bad: bool = False


# --------------------------------------------------------------------------- loss, optim, schedule

@dataclass
class LossConfig:
    # softmax, svm_l1 or svm_l2
    name: str = MISSING


@dataclass
class MarginLossConfig(LossConfig):
    # the hinge margin
    margin: float = 1.0


@dataclass
class OptimConfig:
    # registry name in numexp.optim.OPTIMIZERS
    name: str = MISSING
    # torch's L2 on every parameter; prefer the top-level `reg` (weights only, the seed's penalty)
    weight_decay: float = 0.0


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


@dataclass
class AdagradConfig(OptimConfig):
    lr_decay: float = 0.0
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0


@dataclass
class RMSpropConfig(OptimConfig):
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0


@dataclass
class AdamConfig(OptimConfig):
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    # fixed, step, exp_decay, cosine or dynamic
    name: str = MISSING


@dataclass
class StepConfig(ScheduleConfig):
    # epochs between drops
    step_size: int = 20
    # lr multiplier at each drop
    gamma: float = 0.1


@dataclass
class ExpDecayConfig(ScheduleConfig):
    # lr multiplier per epoch
    gamma: float = 0.95


@dataclass
class CosineConfig(ScheduleConfig):
    # final lr (reached after `epochs` epochs)
    eta_min: float = 0.0


@dataclass
class DynamicConfig(ScheduleConfig):
    # epochs between drops; each drop first restores the best-by-val model
    step_size: int = 20
    # lr divisor at each drop
    factor: float = 10.0


# --------------------------------------------------------------------------- top level

@dataclass
class AugmentConfig:
    # training-batch augmenters, applied in order: crop (random crop after zero padding),
    # flip (random horizontal flip; not for traffic signs or digits)
    names: List[str] = field(default_factory=list)
    # crop padding in pixels
    padding: int = 4


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    loss: LossConfig = MISSING
    optim: OptimConfig = MISSING
    schedule: ScheduleConfig = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # base learning rate (schedules scale it per epoch)
    lr: float = MISSING
    # L2 penalty on Linear/Conv2d weights (gradient += reg * W)
    reg: float = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    # seeds weight init, shuffling and dropout (not the data split: see data.seed)
    seed: int = MISSING
    # BLAS threads per run (threadpoolctl); n_jobs * threads should not exceed the cores
    threads: int = MISSING
    # early stopping: stop when val_acc has not improved for this many epochs; 0 = off
    patience: int = MISSING
    # batch size for evaluation (memory only, no effect on results)
    eval_batch_size: int = MISSING
    # continue the run (or sweep) in an existing output folder: finished runs are skipped,
    # unfinished ones go on from their last epoch checkpoint (last.npz)
    resume: bool = False
    # multirun: stop the whole sweep at the first run that fails or diverges (default: the other
    # runs go on and the end-of-sweep summary lists the failures)
    fail_fast: bool = False
    # quick checks (debug=smoke): train at most this many epochs / batches per epoch; 0 = no limit.
    # Separate from `epochs` because an experiment, composed after the preset, sets epochs itself
    max_epochs: int = 0
    max_steps: int = 0
    # free labels and a note for the run: recorded in summary.json, columns of `numexp runs`
    tags: List[str] = field(default_factory=list)
    notes: str = ""


SCHEMAS = {
    "model": {"base_simplenet": SimplenetConfig, "base_simple_convnet": SimpleConvnetConfig,
              "base_lenet5": Lenet5Config, "base_mlp": MLPConfig,
              "base_softmax_regression": SoftmaxRegressionConfig, "base_resnet_small": ResnetSmallConfig},
    "data": {"base_data": DataConfig, "base_digits": DigitsConfig, "base_gtsrb": GtsrbConfig,
             "base_image_folder": ImageFolderConfig},
    "loss": {"base_loss": LossConfig, "base_margin_loss": MarginLossConfig},
    "optim": {"base_sgd": SGDConfig, "base_adagrad": AdagradConfig, "base_rmsprop": RMSpropConfig,
              "base_adam": AdamConfig},
    "schedule": {"base_schedule": ScheduleConfig, "base_step": StepConfig, "base_exp_decay": ExpDecayConfig,
                 "base_cosine": CosineConfig, "base_dynamic": DynamicConfig},
}


def register():
    """Put the schemas in Hydra's ConfigStore (idempotent); call before composing ``numexp.conf``.

    They live under ``schema/<group>`` rather than in the groups themselves, so Hydra's list of
    a group's options (``model=...``) shows only the YAML options; a YAML option pulls its schema
    in with ``- /schema/<group>/base_<name>@_here_``.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


# --------------------------------------------------------------------------- validation

def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _at_least_one(v):
    return v >= 1


def _unit_open(v):
    return 0 < v < 1


# key -> (test, allowed values in words); keys absent from the chosen options are skipped
RULES = {
    "lr": (_positive, "> 0"),
    "reg": (_non_negative, ">= 0"),
    "epochs": (_at_least_one, ">= 1"),
    "batch_size": (_at_least_one, ">= 1"),
    "threads": (_at_least_one, ">= 1"),
    "patience": (_non_negative, ">= 0 (0 = no early stopping)"),
    "eval_batch_size": (_at_least_one, ">= 1"),
    "max_epochs": (_non_negative, ">= 0 (0 = no limit)"),
    "max_steps": (_non_negative, ">= 0 (0 = no limit)"),
    "augment.names": (lambda v: set(v) <= set(AUGMENTERS), f"a list of {', '.join(AUGMENTERS)}"),
    "augment.padding": (_non_negative, ">= 0"),
    "model.init_std": (_positive, "> 0"),
    "model.filters": (_at_least_one, ">= 1"),
    "model.hidden": (lambda v: v >= 1 if isinstance(v, int) else len(v) > 0 and min(v) >= 1,
                     "positive widths"),
    "model.channels": (_at_least_one, ">= 1"),
    "model.padding": (lambda v: v is None or v >= 0, ">= 0 or null"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.val_fraction": (_unit_open, "in (0, 1): the best model is chosen on validation"),
    "data.test_fraction": (_unit_open, "in (0, 1)"),
    "data.fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.size": (lambda v: v is None or v >= 1, ">= 1 or null (native size)"),
    "data.channels": (lambda v: v in (1, 3), "1 or 3"),
    "loss.margin": (_positive, "> 0"),
    "optim.weight_decay": (_non_negative, ">= 0"),
    "optim.momentum": (_non_negative, ">= 0"),
    "optim.dampening": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.eps": (_positive, "> 0"),
    "optim.alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.lr_decay": (_non_negative, ">= 0"),
    "optim.initial_accumulator_value": (_non_negative, ">= 0"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1)"),
    "schedule.step_size": (_at_least_one, ">= 1"),
    "schedule.gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "schedule.factor": (lambda v: v >= 1, ">= 1"),
    "schedule.eta_min": (_non_negative, ">= 0"),
}


def validate(cfg):
    """Check the values of a composed config; raise :class:`ConfigError` naming the first bad key.

    Types and unknown keys are already checked by the schemas when Hydra composes; keys added
    with ``+key=...`` or removed with ``~key`` are caught here.
    """
    _check_known_keys(cfg, Config)
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} is required: set it on the command line, e.g. {key}=...")
    if cfg.data.name == "image_folder" and not cfg.data.root:
        raise ConfigError("data.root is required for data=image_folder: data.root=/path/to/class/folders")
    for key, (test, allowed) in RULES.items():
        node = OmegaConf.select(cfg, key, default=_ABSENT)
        if node is _ABSENT:
            continue
        value = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
        if not _passes(test, value):
            raise ConfigError(f"{key}={_show(value)} is invalid: must be {allowed}")
    if cfg.schedule.name == "cosine" and cfg.schedule.eta_min >= cfg.lr:
        raise ConfigError(f"schedule.eta_min={cfg.schedule.eta_min} is invalid: must be < lr ({cfg.lr})")


_ABSENT = object()


def _check_known_keys(node, schema, prefix=""):
    """Refuse keys the schemas do not have (``+key=value`` can add them) and schema keys that
    are gone (``~key`` removes them)."""
    fields = {f.name: f.type for f in dataclasses.fields(schema)}
    for key in node:
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown key {name}: valid keys{' in ' + prefix[:-1] if prefix else ''} are "
                              f"{', '.join(fields)}")
        child_type = OmegaConf.get_type(node, key)
        if dataclasses.is_dataclass(child_type):
            _check_known_keys(node[key], child_type, f"{name}.")
    for key in fields:
        if key not in node:
            raise ConfigError(f"{prefix}{key} is required: do not remove it (~{prefix}{key})")


def _passes(test, value):
    try:
        ok = test(value)
    except TypeError:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return bool(ok)


def _show(value):
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, (list, tuple)) else str(value)


def task_config(cfg):
    """The run's own config: ``cfg`` without Hydra's ``hydra`` node (a copy when it has one)."""
    if "hydra" not in cfg:
        return cfg
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


# --------------------------------------------------------------------------- identity

# Keys that control how a run is executed or describe it, not what it computes: left out of its
# identity, so `resume=true` continues a run that was started without them.
NOT_IDENTITY = ("resume", "fail_fast", "tags", "notes")


def identity(cfg):
    """The resolved config that defines what a run computes (everything but :data:`NOT_IDENTITY`)."""
    out = OmegaConf.to_container(task_config(cfg), resolve=True, enum_to_str=True)
    for key in NOT_IDENTITY:
        out.pop(key, None)
    return out


def config_hash(cfg):
    """16 hex digits identifying :func:`identity`: equal hashes = the same run (same seed included)."""
    text = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- model fit, before any data is read

# (channels, native side) of the data sets whose input shape is known without reading them
_NATIVE = {"digits": (1, 8), "mnist": (1, 28), "cifar10": (3, 32), "gtsrb": (3, None)}


def expected_in_shape(data_cfg):
    """The (C, H, W) the loader will produce, or None when only the files can tell (native sizes)."""
    if data_cfg.name == "image_folder":
        channels, native = int(data_cfg.channels), None
    elif data_cfg.name in _NATIVE:
        channels, native = _NATIVE[data_cfg.name]
    else:
        return None
    side = data_cfg.get("size") or native
    return None if side is None else (channels, int(side), int(side))


def model_misfit(cfg, in_shape, error):
    """The :class:`ConfigError` for a model that cannot take ``in_shape``."""
    return ConfigError(f"model={cfg.model.name} does not fit data={cfg.data.name} (input {tuple(in_shape)}): "
                       f"{error}. Pick another model or data.size")


def check_model_fits(cfg):
    """Build the model for the input shape the data set will have (when known without reading it).

    Raises:
        ConfigError: the model cannot take that input (e.g. LeNet-5 on 8x8 digits).
    """
    in_shape = expected_in_shape(cfg.data)
    if in_shape is None:
        return
    try:
        models.build(cfg.model.name, in_shape=in_shape, num_classes=2, **options(cfg.model))
    except models.ModelError as e:
        raise model_misfit(cfg, in_shape, e) from None


# --------------------------------------------------------------------------- composition errors in one line

_TYPE_WORDS = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false", "String": "a string"}


def error_line(error):
    """A one-line message for a configuration error raised by Hydra, OmegaConf or numexp.

    Hydra's own messages span several lines (and list options one per line); this keeps the key,
    the value and what is allowed.
    """
    if isinstance(error, MissingConfigException) and error.options is not None and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option: {group} is one of {', '.join(error.options)}"
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        key = cause.full_key
        reason = str(cause.msg).splitlines()[0]
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            schema = cause.object_type
            if dataclasses.is_dataclass(schema):
                parent = key.rpartition(".")[0]
                names = ", ".join(f.name for f in dataclasses.fields(schema))
                return f"unknown key {key}: valid keys{' in ' + parent if parent else ''} are {names}"
            return f"unknown key {key}"
        value = str(error).partition("override ")[2].partition("=")[2] or cause.value
        converted = re.search(r"could not be converted to (\w+)", reason)
        if converted:
            return f"{key}={value} is invalid: must be {_TYPE_WORDS.get(converted[1], converted[1])}"
        expected = re.search(r"expected one of (\[.*\])", reason)
        if expected:
            return f"{key}={value} is invalid: must be one of {expected[1]}"
        if "is not Optional" in reason:
            return f"{key} cannot be null"
        return f"{key}={value}: {reason}"
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def options(cfg, *skip):
    """A group node as plain keyword arguments, without ``name`` and the keys in ``skip``."""
    out = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in ("name", *skip):
        out.pop(key, None)
    return out
