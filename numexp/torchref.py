"""The same network in PyTorch, for parity tests and benchmarks only (torch is never needed to train).

``to_torch(model)`` maps every numexp layer to its torch counterpart and copies the parameters
and buffers, so both compute the same function; state-dict keys are the same dotted names.
"""
from collections import OrderedDict

import numpy as np

from numexp import nn


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("PyTorch is not installed; it is a test/benchmark extra: pip install -e '.[test]'") from None
    return torch


def _residual_class():
    torch = _torch()

    class TorchResidual(torch.nn.Module):
        """torch twin of :class:`numexp.nn.Residual` (torchvision's BasicBlock layout)."""

        def __init__(self, block):
            super().__init__()
            c1, c2 = block.conv1, block.conv2
            self.conv1 = torch.nn.Conv2d(c1.in_channels, c1.out_channels, 3, c1.stride, 1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(c1.out_channels)
            self.conv2 = torch.nn.Conv2d(c2.in_channels, c2.out_channels, 3, 1, 1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(c2.out_channels)
            self.downsample = None
            if block.downsample is not None:
                self.downsample = torch.nn.Sequential(
                    torch.nn.Conv2d(c1.in_channels, c1.out_channels, 1, c1.stride, 0, bias=False),
                    torch.nn.BatchNorm2d(c1.out_channels))

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            return torch.relu(h + (x if self.downsample is None else self.downsample(x)))

    return TorchResidual


def torch_layer(layer):
    """The torch module that computes what the numexp ``layer`` computes (parameters not copied)."""
    torch = _torch()
    tnn = torch.nn
    if isinstance(layer, nn.Linear):
        return tnn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
    if isinstance(layer, nn.Conv2d):
        return tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, bias="bias" in layer.params)
    if isinstance(layer, nn.BatchNorm2d):
        return tnn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum)
    if isinstance(layer, nn.BatchNorm1d):
        return tnn.BatchNorm1d(layer.num_features, layer.eps, layer.momentum)
    if isinstance(layer, nn.MaxPool2d):
        return tnn.MaxPool2d(layer.kernel_size, layer.stride)
    if isinstance(layer, nn.AvgPool2d):
        return tnn.AvgPool2d(layer.kernel_size, layer.stride)
    if isinstance(layer, nn.Residual):
        return _residual_class()(layer)
    if isinstance(layer, nn.Sequential):
        return tnn.Sequential(OrderedDict((name, torch_layer(child)) for name, child in layer.children()))
    if isinstance(layer, nn.Dropout):
        return tnn.Dropout(layer.p)
    simple = {nn.ReLU: tnn.ReLU, nn.Sigmoid: tnn.Sigmoid, nn.Tanh: tnn.Tanh, nn.Flatten: tnn.Flatten,
              nn.GlobalAvgPool2d: lambda: tnn.AdaptiveAvgPool2d(1), nn.Softmax: lambda: tnn.Softmax(dim=1)}
    if type(layer) in simple:
        return simple[type(layer)]()
    raise TypeError(f"no torch counterpart for {type(layer).__name__}")


def copy_state(model, torch_module):
    """Copy numexp's parameters and buffers into ``torch_module`` (same dotted keys)."""
    torch = _torch()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.state_dict().items()}
    result = torch_module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise KeyError(f"torch twin does not match: missing {missing}, unexpected {result.unexpected_keys}")
    return torch_module


def to_torch(model, dtype=None):
    """A torch twin of a numexp Sequential/model with the same parameters, in ``dtype`` (default: the model's)."""
    torch = _torch()
    twin = torch_layer(model)
    arrays = list(model.state_dict().values())
    dtype = np.dtype(dtype or (arrays[0].dtype if arrays else nn.get_default_dtype()))
    twin = twin.to(torch.float64 if dtype == np.float64 else torch.float32)
    copy_state(model, twin)
    twin.train(model.training)
    return twin
