"""Networks built by name from the input shape: ``build("simplenet", in_shape=(3, 32, 32), num_classes=43)``.

Every size (flatten width, LeNet-5's padding) is derived from ``in_shape`` by shape
arithmetic; a model that cannot fit its input fails here with a :class:`ModelError`.
"""
from collections import OrderedDict

import numpy as np

from numexp import nn


class ModelError(ValueError):
    """A model name, option or input shape that cannot work; the message says which and why."""


class Model(nn.Sequential):
    """A named Sequential that knows its input shape; ``repr`` shows each layer's output shape."""

    def __init__(self, layers, in_shape):
        super().__init__(layers)
        self.in_shape = tuple(in_shape)

    def layer_table(self):
        """(name, layer, output shape) per top-level layer for one sample of ``in_shape``."""
        return self.output_shapes(self.in_shape)

    def __repr__(self):
        lines = [f"  ({name}): {layer!r} -> {shape}" for name, layer, shape in self.layer_table()]
        return f"{type(self).__name__}(in_shape={self.in_shape},\n" + "\n".join(lines) + "\n)"


def _activation(name):
    table = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
    if name not in table:
        raise ModelError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


def _pool(name, size=2):
    table = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
    if name not in table:
        raise ModelError(f"unknown pool {name!r}; choose one of {sorted(table)}")
    return table[name](size)


class _Builder:
    """Appends named layers while tracking the per-sample shape, so Linear widths come from the data."""

    def __init__(self, in_shape, rng):
        self.shape = tuple(in_shape)
        self.rng = rng
        self.layers = OrderedDict()

    def add(self, name, layer):
        shape = layer.output_shape(self.shape)
        if min(shape) < 1:
            raise ModelError(f"layer '{name}' ({type(layer).__name__}) gets input {self.shape} and would output "
                             f"{shape}: the input is too small for this model")
        self.layers[name] = layer
        self.shape = shape
        return self

    def conv(self, name, out_channels, kernel_size, stride=1, padding=0, bias=True):
        return self.add(name, nn.Conv2d(self.shape[0], out_channels, kernel_size, stride, padding,
                                        bias=bias, rng=self.rng))

    def linear(self, name, out_features):
        return self.add(name, nn.Linear(self.shape[0], out_features, rng=self.rng))

    def flatten(self, name="flatten"):
        return self.add(name, nn.Flatten())


def simplenet(in_shape, num_classes, rng):
    """The GTSRB seed network: [Conv3x3(32, no bias)-BN-ReLU-MaxPool2] -> [Conv3x3(64, no bias)-BN-ReLU-MaxPool2]
    -> Flatten -> Linear(3072) -> ReLU -> Linear(K). On 3x32x32 the flatten size is 4096."""
    b = _Builder(in_shape, rng)
    b.conv("conv1", 32, 3, padding=1, bias=False).add("bn1", nn.BatchNorm2d(32)).add("relu1", nn.ReLU())
    b.add("pool1", nn.MaxPool2d(2))
    b.conv("conv2", 64, 3, padding=1, bias=False).add("bn2", nn.BatchNorm2d(64)).add("relu2", nn.ReLU())
    b.add("pool2", nn.MaxPool2d(2))
    b.flatten().linear("fc1", 3072).add("relu3", nn.ReLU()).linear("fc2", num_classes)
    return b


def simple_convnet(in_shape, num_classes, rng, filters=30, hidden=100):
    """"Deep Learning from Scratch" SimpleConvNet: Conv5x5(30)-ReLU-MaxPool2 -> Linear(100)-ReLU -> Linear(K)."""
    b = _Builder(in_shape, rng)
    b.conv("conv1", filters, 5).add("relu1", nn.ReLU()).add("pool1", nn.MaxPool2d(2))
    b.flatten().linear("fc1", hidden).add("relu2", nn.ReLU()).linear("fc2", num_classes)
    return b


def lenet5(in_shape, num_classes, rng, activation="sigmoid", pool="avg", padding=None):
    """LeNet-5: Conv5x5(6)-act-pool -> Conv5x5(16)-act-pool -> 120-act -> 84-act -> K.

    Classic is sigmoid with average pooling; ``activation="relu", pool="max"`` is the modern
    variant. ``padding=None`` pads conv1 by 2 on 28x28 inputs (as for MNIST), 0 otherwise.
    """
    if padding is None:
        padding = 2 if tuple(in_shape[1:]) == (28, 28) else 0
    b = _Builder(in_shape, rng)
    b.conv("conv1", 6, 5, padding=padding).add("act1", _activation(activation)).add("pool1", _pool(pool))
    b.conv("conv2", 16, 5).add("act2", _activation(activation)).add("pool2", _pool(pool))
    b.flatten().linear("fc1", 120).add("act3", _activation(activation))
    b.linear("fc2", 84).add("act4", _activation(activation)).linear("fc3", num_classes)
    return b


def mlp(in_shape, num_classes, rng, hidden=(100,), activation="relu", dropout=0.0):
    """Multi-layer perceptron: Flatten -> [Linear(h) -> act (-> Dropout)] per hidden size -> Linear(K)."""
    b = _Builder(in_shape, rng).flatten()
    for i, width in enumerate(hidden, start=1):
        b.linear(f"fc{i}", width).add(f"act{i}", _activation(activation))
        if dropout:
            b.add(f"drop{i}", nn.Dropout(dropout, rng=rng))
    return b.linear(f"fc{len(hidden) + 1}", num_classes)


def softmax_regression(in_shape, num_classes, rng):
    """A single Linear layer on the flattened input (pair it with the softmax loss)."""
    return _Builder(in_shape, rng).flatten().linear("fc", num_classes)


def resnet_small(in_shape, num_classes, rng, channels=16):
    """Small ResNet: Conv3x3-BN-ReLU stem -> Residual(c, c) -> Residual(c, 2c, stride 2, projection)
    -> global average pool -> Linear(K)."""
    b = _Builder(in_shape, rng)
    b.conv("conv1", channels, 3, padding=1, bias=False).add("bn1", nn.BatchNorm2d(channels)).add("relu1", nn.ReLU())
    b.add("layer1", nn.Residual(channels, channels, rng=rng))
    b.add("layer2", nn.Residual(channels, 2 * channels, stride=2, rng=rng))
    b.add("pool", nn.GlobalAvgPool2d()).flatten().linear("fc", num_classes)
    return b


MODELS = {
    "simplenet": (simplenet, "he"),
    "simple_convnet": (simple_convnet, "he"),
    "lenet5": (lenet5, "xavier"),
    "mlp": (mlp, "he"),
    "softmax_regression": (softmax_regression, "normal"),
    "resnet_small": (resnet_small, "he"),
}


def initialize(model, init, rng, std=0.01):
    """Re-draw every Linear/Conv2d weight with ``init`` and zero their biases.

    Args:
        init: "he" (N(0, 2/fan_in), for ReLU nets), "xavier" (N(0, 2/(fan_in+fan_out))),
            "normal" (N(0, std**2), the seeds use 0.01 and 1e-3) or "torch" (keep torch's default uniform).
    """
    if init == "torch":
        return
    for _, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        w = module.params["weight"]
        receptive = int(np.prod(w.shape[2:]))
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        if init == "he":
            new = nn.kaiming_normal(w.shape, fan_in, rng)
        elif init == "xavier":
            new = nn.xavier_normal(w.shape, fan_in, fan_out, rng)
        elif init == "normal":
            new = rng.standard_normal(w.shape) * std
        else:
            raise ModelError(f"unknown init {init!r}; choose one of he, xavier, normal, torch")
        w[...] = new
        if "bias" in module.params:
            module.params["bias"][...] = 0


def build(name, in_shape, num_classes, rng=None, init=None, init_std=0.01, **options):
    """Build the model registered as ``name`` for inputs of shape ``in_shape`` = (C, H, W).

    Args:
        name: one of ``MODELS``.
        in_shape: one sample's shape (C, H, W); num_classes: K.
        rng: np.random.Generator for the initial weights (and Dropout masks); seed 0 when None.
        init: weight initialisation (see :func:`initialize`); each model has its own default.
        options: the model function's keyword options (e.g. ``hidden`` for mlp).

    Raises:
        ModelError: unknown name or option, or an input the model cannot fit.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ModelError(f"in_shape must be (C, H, W) with positive sizes, got {tuple(in_shape)}")
    rng = rng if rng is not None else np.random.default_rng(0)
    make, default_init = MODELS[name]
    if options.get("activation") == "relu":
        default_init = "he"
    try:
        builder = make(tuple(int(s) for s in in_shape), int(num_classes), rng, **options)
    except TypeError as e:
        raise ModelError(f"model {name!r}: {e}") from None
    except ModelError as e:
        raise ModelError(f"model {name!r} cannot take input of shape {tuple(in_shape)}: {e}") from None
    model = Model(builder.layers, in_shape)
    initialize(model, init or default_init, rng, init_std)
    return model
