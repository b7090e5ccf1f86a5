"""The optimizer benchmark: one update of each registered optimizer over all of SimpleNet's
parameters (12.7M, FC1's 12.6M weights among them) from fixed gradients, numexp against
``torch.optim`` with its CPU defaults, in one process (``python -m numexp.bench --optimizers``).

Plain SGD is timed here as ``step`` updates it; the trainer instead folds FC1's update into its
backward pass (``SGD.fuse_into_backward``), so the training rows of the main bench include it.
"""
import contextlib

import numpy as np
from threadpoolctl import threadpool_limits

from numexp import models, optim, torchref

MODEL = "simplenet"
LR = 1e-5  # small: the parameters drift little over the rounds

# numexp registry name -> (torch.optim class name, its options), the same rules as optim.OPTIMIZERS
TORCH_OPTIMIZERS = {
    "sgd": ("SGD", {}),
    "momentum": ("SGD", {"momentum": 0.9}),
    "nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "adagrad": ("Adagrad", {}),
    "rmsprop": ("RMSprop", {}),
    "adam": ("Adam", {}),
}
OPTIM_COLUMNS = ["optimizer", "threads", "params", "numexp_ms", "torch_ms", "update_vs_torch"]


def model_with_gradients(spec, rng):
    """SimpleNet with a gradient of every parameter set (standard normal * 1e-3, float32)."""
    model = models.build(MODEL, spec["in_shape"], spec["num_classes"], rng=rng, **spec["options"])
    for _, module in model.named_modules():
        module.grads = {k: rng.standard_normal(p.shape, dtype=p.dtype) * np.float32(1e-3)
                        for k, p in module.params.items()}
    return model


def torch_copy(model):
    """The torch module of ``model`` with the same gradients."""
    import torch
    module = torchref.to_torch(model)
    grads = dict(model.named_grads())
    for name, p in module.named_parameters():
        p.grad = torch.from_numpy(grads[name].copy())
    return module


def bench_optimizers(spec, plan, time_rounds, paired_ratio, use_torch, threads=1):
    """One row per optimizer: median ms per update of numexp and torch, and torch's time / numexp's
    (above 1: numexp is faster), paired round by round. ``time_rounds`` and ``paired_ratio`` are the
    bench's own (:mod:`numexp.bench`); ``plan`` its :class:`numexp.bench.Rounds`."""
    model = model_with_gradients(spec, np.random.default_rng(0))
    module = torch_copy(model) if use_torch else None
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(threadpool_limits(threads))
        if use_torch:
            import torch
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, previous)
        for name in optim.OPTIMIZERS:
            ours = optim.build(name, model, lr=LR)
            ours.threads = threads  # as numexp.parallel.parallelize sets it for a run
            runners = [("numexp", ours.step)]
            if use_torch:
                cls, options = TORCH_OPTIMIZERS[name]
                runners.append(("torch", getattr(torch.optim, cls)(module.parameters(), lr=LR, **options).step))
            times = time_rounds(runners, plan)
            ms = {label: 1e3 * float(np.median(t)) for label, t in times.items()}
            rows.append(dict(optimizer=name, threads=threads, params=int(model.num_params()),
                             numexp_ms=ms["numexp"], torch_ms=ms.get("torch", float("nan")),
                             update_vs_torch=paired_ratio(times, "numexp")))
    return rows


def print_optimizers(rows):
    print(f"one update of SimpleNet's {rows[0]['params']:,} parameters (ms; vs torch above 1: numexp faster)")
    print(" ".join(f"{c:>16}" for c in OPTIM_COLUMNS))
    for r in rows:
        print(" ".join(f"{r[c]:>16.2f}" if isinstance(r[c], float) else f"{str(r[c]):>16}" for c in OPTIM_COLUMNS))
