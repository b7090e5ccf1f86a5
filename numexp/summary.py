"""A network, layer by layer: output shapes, parameters and multiply-accumulates.

    numexp summary model=simplenet data=gtsrb          # any model on any data set's input shape
    numexp summary model=lenet5 data=digits data.size=28
    numexp summary RUN                                 # the model of a run folder
    python -m numexp.summary model=mlp "model.hidden=[256,128]" data=mnist

The input shape comes from the data config alone, without loading any data: (channels,
``data.size`` or the data set's native side); the class count from the class names shipped
with numexp (``image_folder``: the class folders under ``data.root``, or ``--num-classes``).

Note:
    MACs are the multiply-accumulates of the weight products per image (batch of one):
    ``C_out * H_out * W_out * C_in * k * k`` for Conv2d and ``in_features * out_features`` for
    Linear. Bias additions, BatchNorm, activations, pooling and residual additions are not
    counted, as is usual for MAC counts.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from numexp import nn
from numexp.data.base import read_class_names

# data set -> (channels, native side, shipped class-name file); the side None = no fixed native size
NATIVE = {"digits": (1, 8, "digits_names.txt"), "mnist": (1, 28, "digits_names.txt"),
          "cifar10": (3, 32, "cifar10_names.txt"), "gtsrb": (3, None, "gtsrb_names.txt")}


class SummaryError(Exception):
    """An input shape or class count that cannot be derived; the message says what to set."""


@dataclass
class LayerRow:
    """One layer: dotted name (the state-dict prefix), type, output shape of one sample, own
    parameter count, multiply-accumulates per sample."""
    name: str
    type: str
    output_shape: tuple
    params: int
    macs: int


def layer_macs(layer, in_shape, out_shape):
    """Multiply-accumulates of ``layer`` for one sample (0 for layers without weight products)."""
    if isinstance(layer, nn.Conv2d):
        return int(np.prod(out_shape)) * layer.in_channels * layer.kernel_size * layer.kernel_size
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features
    return 0


def layer_rows(model, in_shape=None):
    """One :class:`LayerRow` per leaf layer, in order, by shape arithmetic (no forward pass).

    Sequential containers run their children in order; a Residual block runs its main path in
    order and its ``downsample`` shortcut on the block's input.
    """
    rows = []

    def leaf(module, name, shape):
        out = tuple(module.output_shape(shape))
        rows.append(LayerRow(name, type(module).__name__, out, int(sum(p.size for p in module.params.values())),
                             layer_macs(module, shape, out)))
        return out

    def walk(module, prefix, shape):
        children = list(module.children())
        if not children:
            return leaf(module, prefix, shape)
        h = shape
        for name, child in children:
            dotted = f"{prefix}.{name}" if prefix else name
            if isinstance(module, nn.Residual) and name == "downsample":
                walk(child, dotted, shape)
            else:
                h = walk(child, dotted, h)
        return tuple(module.output_shape(shape))

    walk(model, "", tuple(in_shape if in_shape is not None else model.in_shape))
    return rows


def num_buffers(model):
    """Values in the model's buffers (BatchNorm running statistics): in the checkpoint, not trained."""
    return int(sum(b.size for _, b in model.named_buffers()))


def layer_summary(model, in_shape=None):
    """The layer table as text: name, type, output shape, parameters, MACs per layer, then totals.

    Args:
        model: a :class:`numexp.models.Model` (or any Sequential, with ``in_shape`` given).
        in_shape: one sample's (C, H, W); default ``model.in_shape``.
    """
    in_shape = tuple(in_shape if in_shape is not None else model.in_shape)
    rows = layer_rows(model, in_shape)
    table = [("layer", "type", "output shape", "params", "MACs"), ("input", "", _shape(in_shape), "", "")]
    table += [(r.name, r.type, _shape(r.output_shape), f"{r.params:,}", f"{r.macs:,}") for r in rows]
    params, macs = sum(r.params for r in rows), sum(r.macs for r in rows)
    table.append(("total", "", "", f"{params:,}", f"{macs:,}"))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    right = (False, False, False, True, True)

    def line(row):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    rule = "-" * len(line(table[0]))
    lines = [line(table[0]), rule] + [line(row) for row in table[1:-1]] + [rule, line(table[-1])]
    buffers = num_buffers(model)
    lines.append(f"{params:,} parameters ({params * 4 / 2**20:.2f} MiB as float32)"
                 + (f", {buffers:,} buffer values (BatchNorm running statistics)" if buffers else "")
                 + f"; {_human(macs)} MACs per image")
    return "\n".join(lines)


def _shape(shape):
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _human(n):
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


# --------------------------------------------------------------------------- input shapes

def input_spec(data_cfg, num_classes=None):
    """(in_shape, num_classes) of a data config, without loading the data.

    Raises:
        SummaryError: no fixed input size (``data.size=null`` on GTSRB or image_folder), or an
            image_folder class count that cannot be counted.
    """
    name = str(data_cfg.name)
    size = data_cfg.get("size")
    if name in NATIVE:
        channels, native, names_file = NATIVE[name]
        side = size if size is not None else native
        k = num_classes or len(read_class_names(names_file))
    elif name == "image_folder":
        channels, side = int(data_cfg.get("channels", 3)), size
        k = num_classes or _count_class_folders(data_cfg.get("root"))
    else:
        raise SummaryError(f"unknown data set {name!r}: choose one of {', '.join([*NATIVE, 'image_folder'])}")
    if side is None:
        raise SummaryError(f"data={name} with data.size=null has no fixed input size: set data.size=N")
    return (int(channels), int(side), int(side)), int(k)


def _count_class_folders(root):
    if root:
        for folder in (Path(root) / "train", Path(root)):
            if folder.is_dir():
                found = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
                if found:
                    return len(found)
    raise SummaryError("data=image_folder: the class count comes from the class folders under data.root; "
                       "set data.root=/path/to/class/folders or give --num-classes K")


def compose(overrides):
    """The config ``numexp OVERRIDES`` would train, validated; errors as :class:`SummaryError`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from numexp import config

    config.register()
    try:
        with initialize_config_module(config_module="numexp.conf", version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        config.validate(cfg)
    except (HydraException, OmegaConfBaseException, config.ConfigError) as e:
        raise SummaryError(config.error_line(e)) from None
    return cfg


def build(cfg, in_shape, num_classes):
    """The configured model for ``in_shape`` (weights drawn with seed 0; only their shapes matter here)."""
    from numexp import config
    from numexp.trainer import build_model

    try:
        return build_model(cfg, SimpleNamespace(in_shape=in_shape, num_classes=num_classes),
                           np.random.default_rng(0))
    except config.ConfigError as e:
        raise SummaryError(str(e)) from None


def run_spec(run_dir):
    """(config, in_shape, num_classes) of a run folder, from its config and summary.json."""
    from omegaconf import OmegaConf

    from numexp.rundir import SUMMARY, read_json

    run_dir = Path(run_dir)
    try:
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
    except (OSError, ValueError) as e:
        raise SummaryError(f"cannot read the run folder {run_dir}: {e}") from None
    info = summary.get("data") or {}
    if info.get("in_shape") and info.get("num_classes"):
        return cfg, tuple(int(d) for d in info["in_shape"]), int(info["num_classes"])
    return (cfg, *input_spec(cfg.data))


def main(argv=None):
    """``numexp summary`` / ``python -m numexp.summary``; exit code 0, 1 for a config that cannot be
    summarised, 2 for a usage error."""
    parser = argparse.ArgumentParser(
        prog="numexp summary",
        description="One row per layer (dotted name, output shape, parameters, multiply-accumulates) and "
                    "totals, for any model on any data set's input shape, or for a run folder.")
    parser.add_argument("args", nargs="*", metavar="RUN|KEY=VALUE",
                        help="config overrides as for training (model=..., data=..., data.size=...), "
                             "or a run folder")
    parser.add_argument("--num-classes", type=int, metavar="K",
                        help="number of classes (default: from the data set's class names)")
    args = parser.parse_args(argv)
    overrides = [a for a in args.args if "=" in a]
    runs = [a for a in args.args if "=" not in a]
    if len(runs) > 1 or (runs and overrides):
        parser.error("give either one run folder or KEY=VALUE overrides")
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f"--num-classes must be >= 1, got {args.num_classes}")
    try:
        if runs:
            if not (Path(runs[0]) / ".hydra").is_dir():
                raise SummaryError(f"{runs[0]} is not a run folder (no .hydra/ inside); overrides are KEY=VALUE")
            cfg, in_shape, k = run_spec(runs[0])
            k = args.num_classes or k
        else:
            cfg = compose(overrides)
            in_shape, k = input_spec(cfg.data, args.num_classes)
        model = build(cfg, in_shape, k)
    except SummaryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{cfg.model.name} on data={cfg.data.name}: input {in_shape}, {k} classes")
    print(layer_summary(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
