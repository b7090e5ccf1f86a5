"""Engine benchmark: numexp against the same network in PyTorch, in one process.

    python -m numexp.bench                       # simplenet + lenet5 + simple_convnet, 1 and 2 threads
    python -m numexp.bench --models simplenet --threads 2 --out results/bench.csv
    python -m numexp.bench --models lenet5_classic resnet_small   # two models outside the targets
    python -m numexp.bench --sweep               # a 4-run multirun, n_jobs=2 against n_jobs=1
    python -m numexp.bench --optimizers          # one update of each optimizer, numexp against torch.optim

For each model and thread count it times a training step (forward + loss + backward + SGD
step, batch 64, float32) and an eval forward pass, in settled rounds that alternate which
framework goes first (OpenBLAS threads spin for a while after a call and slow whatever runs
next), and reports medians, the speed ratio numexp/torch (the median of the ratios of paired
rounds, which a machine drifting over minutes does not skew), the achieved GFLOP/s against a plain
float32 GEMM measured on the spot, and each framework's peak memory (in a fresh process).
Without torch installed it reports numexp alone.

Then, in separate instrumented rounds (so the instruments never touch the headline numbers), it
times every top-level layer's forward and backward inside a training step, plus the loss and the
optimizer step, for both frameworks: the next bottleneck is the largest row.

Last it prints the engine's targets that the run measured (:data:`TRAIN_TARGETS` and the rest), each
with its value and whether it was met, and writes them to ``bench_targets.csv``; ``--sweep`` prints the
sweep's target.

Writes ``results/bench.csv``, ``results/bench_layers.csv``, ``results/bench_targets.csv`` and two charts
beside them, ``bench.png`` (train and eval ratio numexp/torch) and ``bench_layers.png`` (per-layer ms).
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from numexp import bench_optim, bench_sweep, kernels_choice, losses, models, nn, optim, parallel

BENCH_MODELS = {
    "simplenet": dict(in_shape=(3, 32, 32), num_classes=43, options={}),
    "lenet5": dict(in_shape=(1, 32, 32), num_classes=10, options={"activation": "relu", "pool": "max"}),
    "simple_convnet": dict(in_shape=(1, 28, 28), num_classes=10, options={}),
    # outside the engine issue's table, timed on request (--models): the classic LeNet-5 (sigmoid, average
    # pooling: model=lenet5's default, half of the seed study's grid) and resnet_small, a run's default model
    "lenet5_classic": dict(model="lenet5", in_shape=(1, 28, 28), num_classes=10, options={}),
    "resnet_small": dict(in_shape=(1, 28, 28), num_classes=10, options={}),
}
DEFAULT_MODELS = ["simplenet", "lenet5", "simple_convnet"]  # the table's targets
BATCH = 64


def have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def step_flops(model, batch):
    """FLOPs (2 per multiply-add) of one training step: the GEMMs of forward, and twice that for backward.

    Conv input shapes are read off an eval forward pass on one sample, so nested blocks count too.
    """
    model.eval()
    model(np.zeros((1,) + model.in_shape, dtype=np.float32))
    macs = 0
    for _, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            macs += layer.in_features * layer.out_features
        elif isinstance(layer, nn.Conv2d):
            cache = layer._cache  # the input's shape first, or the input itself (method "naive")
            in_shape = (cache.shape if isinstance(cache, np.ndarray) else cache[0])[1:]
            macs += math.prod(layer.output_shape(in_shape)) * layer.in_channels * layer.kernel_size ** 2
    return 3 * 2 * macs * batch


def gemm_gflops(threads, m=64, k=4096, n=3072, repeat=20):
    """Float32 GEMM rate on this machine now, at the FC1 shape of SimpleNet."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    with threadpool_limits(threads):
        a @ b
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * m * k * n / np.median(times) / 1e9


class NumexpRunner:
    """numexp's training step and eval pass as the trainer runs them on ``threads`` cores
    (:func:`numexp.parallel.parallelize`): data-parallel replicas with BLAS on one thread, one network
    with BLAS on ``threads``, or replicas up to a large fully connected head that runs on BLAS threads;
    large Linear layers outside the replicas update inside backward."""

    def __init__(self, name, spec, rng, threads=1):
        self.model = models.build(spec.get("model", name), spec["in_shape"], spec["num_classes"], rng=rng,
                                  **spec["options"])
        self.model.set_input_grad(False)  # as torch, which needs no gradient for a plain input tensor
        self.loss = losses.build("softmax")
        self.opt = optim.build("sgd", self.model, lr=1e-3)
        self.net, self.layout = parallel.parallelize(self.model, threads, self.opt)
        self.replicas, self.blas_threads = self.layout["replicas"], self.layout["blas_threads"]

    def limits(self, threads):
        """numexp's BLAS threads, and torch's OpenMP ones, for a round at ``threads`` threads."""
        stack = contextlib.ExitStack()
        stack.enter_context(threadpool_limits(threads, user_api="openmp"))
        stack.enter_context(threadpool_limits(self.blas_threads, user_api="blas"))
        return stack

    def train_step(self, x, y):
        self.net.train()
        _, dscores = self.loss(self.net(x), y)
        self.net.backward(dscores)
        self.opt.step()

    def eval_step(self, x):
        self.net.eval()
        self.net(x)


class TorchRunner:
    def __init__(self, numexp_model):
        import torch
        from numexp import torchref
        self.torch = torch
        self.model = torchref.to_torch(numexp_model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.loss = torch.nn.CrossEntropyLoss()

    def train_step(self, x, y):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(x), y).backward()
        self.opt.step()

    def eval_step(self, x):
        self.model.eval()
        with self.torch.no_grad():
            self.model(x)


@dataclasses.dataclass(frozen=True)
class Rounds:
    """How the timed rounds run: ``rounds`` per framework, each after ``pause`` seconds of rest and
    ``warmup`` seconds of untimed steps, timing ``steps`` steps or more, to last about ``seconds``."""
    rounds: int
    steps: int
    pause: float
    warmup: float = 0.0
    seconds: float = 0.0


def time_rounds(runners, plan):
    """Seconds per call of each (label, fn) in ``runners``, one value per round of ``plan`` (a
    :class:`Rounds`), alternating who goes first. A round runs ``plan.steps`` calls, or more to last
    about ``plan.seconds`` (judged by the warm-up calls), so that a host's hiccup of a few ms weighs
    little even for a 5 ms step."""
    times = {label: [] for label, _ in runners}
    for r in range(plan.rounds):
        order = runners if r % 2 == 0 else runners[::-1]
        for label, fn in order:
            time.sleep(plan.pause)  # let spinning BLAS threads of the previous round settle
            # untimed steps for ``plan.warmup`` seconds (at least one): the first steps after a pause run on
            # caches and cores the host gave to others meanwhile (LeNet-5's first 8 steps after 0.3 s
            # measured up to 2x slower than the ones after them, torch's first one or two)
            fn()
            start, calls = time.perf_counter(), 0
            while time.perf_counter() - start < plan.warmup or calls == 0:
                fn()
                calls += 1
            per_call = (time.perf_counter() - start) / calls
            n = max(plan.steps, math.ceil(plan.seconds / per_call))
            t = time.perf_counter()
            for _ in range(n):
                fn()
            times[label].append((time.perf_counter() - t) / n)
    return times


def paired_ratio(times, label, reference="torch"):
    """Median over rounds of reference's time / label's time in the same round (above 1: ``label`` is
    faster). Both ran seconds apart, so a machine that drifts over minutes (other tenants, clock
    changes) moves both sides of each pair alike; a ratio of the two medians would not cancel it."""
    if reference not in times:
        return float("nan")
    return float(np.median(np.array(times[reference]) / np.array(times[label])))


# --------------------------------------------------------------------------- per-layer times

class StepTimes:
    """Seconds spent per (layer, direction) in each training step; medians over the steps in ms."""

    def __init__(self):
        self.steps = []
        self.current = {}

    def add(self, layer, direction, seconds):
        key = (layer, direction)
        self.current[key] = self.current.get(key, 0.0) + seconds

    def end_step(self):
        """Close the step; the part of its ("step", "total") no other key covers becomes
        ("other", "between layers"): the loops and calls around the layers."""
        total = self.current.get(("step", "total"))
        if total is not None:
            timed = sum(v for k, v in self.current.items() if k != ("step", "total"))
            self.current[("other", "between layers")] = max(total - timed, 0.0)
        self.steps.append(self.current)
        self.current = {}

    def reset(self):
        self.steps, self.current = [], {}

    def medians_ms(self):
        """Median ms of every key seen in any step (0 in a step that skipped it)."""
        keys = {key for step in self.steps for key in step}
        return {key: 1000 * float(np.median([step.get(key, 0.0) for step in self.steps])) for key in keys}


class NumexpLayerClock:
    """Context manager timing each top-level layer's forward and backward inside numexp training steps.

    Each layer's ``forward``/``backward`` is shadowed by a timed instance attribute (Sequential calls
    ``layer.forward``), so the times partition the step: nothing runs between layers but a loop.
    Layers that Sequential runs as one pool-first step (:class:`numexp.nn.PoolFirst`) are timed as
    one row named ``bn1+relu1+pool1``; the layer calls inside it are not counted again.
    """

    def __init__(self, runner):
        self.runner = runner
        self.times = StepTimes()
        self._saved = []
        self._inside_group = False

    def __enter__(self):
        names = {id(layer): name for name, layer in self.runner.model.children()}
        for name, layer in self.runner.model.children():
            for direction in ("forward", "backward"):
                self._saved.append((layer, direction, vars(layer).get(direction)))
                setattr(layer, direction, self._timed(name, direction, getattr(layer, direction)))
        for direction in ("forward", "backward"):
            method = getattr(nn.PoolFirst, direction)
            self._saved.append((nn.PoolFirst, direction, method))
            setattr(nn.PoolFirst, direction, self._timed_group(names, direction, method))
        return self

    def __exit__(self, *exc):
        for owner, direction, before in self._saved:
            if before is None:
                del vars(owner)[direction]
            else:
                setattr(owner, direction, before)
        self._saved = []

    def _timed(self, name, direction, method):
        def timed(arg):
            t = time.perf_counter()
            out = method(arg)
            if not self._inside_group:
                self.times.add(name, direction, time.perf_counter() - t)
            return out
        return timed

    def _timed_group(self, names, direction, method):
        def timed(group, arg):
            self._inside_group = True
            t = time.perf_counter()
            try:
                out = method(group, arg)
            finally:
                self._inside_group = False
            if out is not None:  # None: the group did not run, its layers will, timed on their own
                self.times.add(group_name(group, names), direction, time.perf_counter() - t)
            return out
        return timed

    def train_step(self, x, y):
        """The runner's training step, with the loss, the optimizer and the whole step timed too."""
        r = self.runner
        r.model.train()
        t0 = time.perf_counter()
        scores = r.model(x)
        t1 = time.perf_counter()
        _, dscores = r.loss(scores, y)  # numexp's loss returns its gradient in the same call
        t2 = time.perf_counter()
        r.model.backward(dscores)
        t3 = time.perf_counter()
        r.opt.step()
        t4 = time.perf_counter()
        self.times.add("loss", "forward+backward", t2 - t1)
        self.times.add("optimizer", "step", t4 - t3)
        self.times.add("step", "total", t4 - t0)
        self.times.end_step()


class TorchLayerClock:
    """Context manager timing each top-level module's forward and backward inside torch training steps.

    Forward: forward pre-hook to forward hook. Backward: a hook on each module's output tensor fires
    when its gradient is complete, just before the module's first backward node runs; CPU autograd
    runs the nodes one at a time on the calling thread, and gives AccumulateGrad nodes top priority,
    so the time from one module's mark to the next one's is that module's backward including its
    weight-gradient accumulation. Unlike torch.profiler this adds no per-op overhead and needs no
    mapping from autograd nodes back to modules; the marks partition the backward call exactly.
    """

    def __init__(self, runner):
        self.runner = runner
        self.times = StepTimes()
        self._handles = []
        self._started = {}
        self._marks = []

    def __enter__(self):
        for name, module in self.runner.model.named_children():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(self, name):
        def hook(module, args):
            self._started[name] = time.perf_counter()
        return hook

    def _post_hook(self, name):
        def hook(module, args, output):
            self.times.add(name, "forward", time.perf_counter() - self._started.pop(name))
            # a module that hands back its input (Dropout(0)) has no backward of its own to mark
            if output.requires_grad and not any(output is a for a in args):
                output.register_hook(lambda grad: self._marks.append((name, time.perf_counter())))
        return hook

    def train_step(self, x, y):
        """The runner's training step, with the loss, the optimizer and the whole step timed too."""
        r = self.runner
        r.model.train()
        t0 = time.perf_counter()
        r.opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        scores = r.model(x)
        t2 = time.perf_counter()
        loss = r.loss(scores, y)
        t3 = time.perf_counter()
        self._marks = []
        loss.backward()
        t4 = time.perf_counter()
        r.opt.step()
        t5 = time.perf_counter()
        self.times.add("loss", "forward+backward", t3 - t2)
        starts = [("loss", t3)] + self._marks  # each interval runs from its mark to the next one
        ends = [t for _, t in self._marks] + [t4]
        for (name, start), end in zip(starts, ends):
            self.times.add(name, "forward+backward" if name == "loss" else "backward", end - start)
        self.times.add("optimizer", "step", (t1 - t0) + (t5 - t4))  # zero_grad is optimizer bookkeeping
        self.times.add("step", "total", t5 - t0)
        self.times.end_step()


def group_name(group, names):
    """``bn1+relu1+pool1``: the row name of a pool-first group, from {id(layer): name}."""
    return "+".join(names[id(layer)] for layer in group.layers)


def step_keys(model):
    """(layer, direction) of every per-layer row, in the order a training step runs them (the steps
    of the model's last forward pass: pool-first groups as one row)."""
    ids = {id(layer): name for name, layer in model.children()}
    ran = getattr(model, "_ran", None) or [layer for _, layer in model.children()]
    names = [group_name(step, ids) if isinstance(step, nn.Fused) else ids[id(step)] for step in ran]
    return ([(n, "forward") for n in names] + [("loss", "forward+backward")]
            + [(n, "backward") for n in reversed(names)]
            + [("optimizer", "step"), ("other", "between layers"), ("step", "total")])


def time_layers(name, threads, clocks, plan):
    """Per-layer rows of one model: median ms per (layer, direction) over every instrumented step.

    ``clocks`` maps a framework label to (clock, step function); the rounds alternate and pause as
    the headline ones do.
    """
    with contextlib.ExitStack() as stack:
        for clock, _ in clocks.values():
            stack.enter_context(clock)
        runners = [(label, fn) for label, (_, fn) in clocks.items()]
        for _, fn in runners:  # warm-up: the hooks' first calls
            fn()
        for clock, _ in clocks.values():
            clock.times.reset()
        time_rounds(runners, plan)
    medians = {label: clock.times.medians_ms() for label, (clock, _) in clocks.items()}
    numexp_model = clocks["numexp"][0].runner.model
    nan = float("nan")
    fused = {n for n, layer in numexp_model.children() if getattr(layer, "fused_update", None) is not None}
    layout = clocks["numexp"][0].runner.layout

    def note(layer, direction):
        if layer in fused and direction == "backward":
            return f"numexp's {layer} backward includes its SGD weight update (fused), the optimizer row does not"
        if layout["replicas"] > 1 and (layer, direction) == ("step", "total"):
            where = f"the layers before {layout['head']}" if "head" in layout else "the network"
            return (f"numexp's rows time one network on the whole batch with BLAS on {layout['blas_threads']} "
                    f"thread(s); its training steps run {where} as {layout['replicas']} replicas at once "
                    f"(processes, BLAS on 1 thread each), each on a slice of the batch")
        return ""
    return [dict(model=name, threads=threads, layer=layer, direction=direction,
                 numexp_ms=medians["numexp"].get((layer, direction), nan),
                 torch_ms=sum(medians.get("torch", {}).get((part, direction), nan) for part in layer.split("+")),
                 note=note(layer, direction))
            for layer, direction in step_keys(numexp_model)]


def bench_model(name, threads, plan, use_torch, layers=True):
    """Rows for ``name`` at ``threads`` threads: one per framework (train and eval images/s) and,
    with ``layers``, one per (layer, direction) of a training step (see :func:`time_layers`)."""
    spec = BENCH_MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH,) + spec["in_shape"], dtype=np.float32)
    y = rng.integers(0, spec["num_classes"], BATCH)
    ours = NumexpRunner(name, spec, rng, threads)
    train = [("numexp", lambda: ours.train_step(x, y))]
    evals = [("numexp", lambda: ours.eval_step(x))]
    numexp_clock = NumexpLayerClock(ours)
    clocks = {"numexp": (numexp_clock, lambda: numexp_clock.train_step(x, y))}
    if use_torch:
        import torch
        torch.set_num_threads(threads)
        theirs = TorchRunner(ours.model)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        train.append(("torch", lambda: theirs.train_step(tx, ty)))
        evals.append(("torch", lambda: theirs.eval_step(tx)))
        torch_clock = TorchLayerClock(theirs)
        clocks["torch"] = (torch_clock, lambda: torch_clock.train_step(tx, ty))
    with ours.limits(threads):
        for _, fn in train + evals:  # warm-up: first calls allocate and load kernels
            fn(), fn()
        train_s = time_rounds(train, plan)
        eval_s = time_rounds(evals, plan)
        # after the headline rounds, so the instruments never touch the throughput numbers
        layer_rows = time_layers(name, threads, clocks, plan) if layers else []
    flops = step_flops(ours.model, BATCH)
    rows = []
    for label in train_s:
        train_median, eval_median = float(np.median(train_s[label])), float(np.median(eval_s[label]))
        rows.append(dict(model=name, threads=threads, framework=label,
                         train_img_s=BATCH / train_median, eval_img_s=BATCH / eval_median,
                         train_ms=1000 * train_median, train_gflop_s=flops / train_median / 1e9,
                         train_vs_torch=paired_ratio(train_s, label), eval_vs_torch=paired_ratio(eval_s, label)))
    return rows, layer_rows


def peak_memory_mb(framework, name, threads, steps=10):
    """Peak RSS growth (MB) of ``steps`` training steps in a fresh process, measured after imports."""
    cmd = [sys.executable, "-m", "numexp.bench", "--memory-probe", framework, name, str(threads), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def memory_probe(framework, name, threads, steps):
    """Run in a child process: train ``steps`` steps and print peak RSS growth since after the imports."""
    if framework == "torch":
        import torch
        torch.set_num_threads(threads)
    base = _rss_kb("VmRSS")
    spec = BENCH_MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH,) + spec["in_shape"], dtype=np.float32)
    y = rng.integers(0, spec["num_classes"], BATCH)
    runner = ours = NumexpRunner(name, spec, rng, threads)
    if framework == "torch":
        runner = TorchRunner(runner.model)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    with ours.limits(threads):
        for _ in range(steps):
            runner.train_step(x, y)
    peak_kb = _rss_kb("VmHWM") - base
    if ours.replicas > 1 and framework == "numexp":
        ours.net.close()
        # each replica process's peak RSS, less what it had in common with this process before its
        # first step (counted as if the fork copied everything above ``base``: an overestimate)
        peak_kb += (ours.replicas - 1) * (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss - base)
    print(json.dumps({"peak_mb": peak_kb / 1024}))


def output_paths(out):
    """The files written beside the ``--out`` CSV: per-layer CSV, the two charts, the targets, sweep and
    optimizer CSVs."""
    stem = os.path.splitext(out)[0]
    return dict(csv=out, layers_csv=f"{stem}_layers.csv", png=f"{stem}.png", layers_png=f"{stem}_layers.png",
                targets_csv=f"{stem}_targets.csv", sweep_csv=f"{stem}_sweep.csv", optim_csv=f"{stem}_optim.csv")


# --------------------------------------------------------------------------- the engine's targets

# numexp / torch training images/s, by (model, threads); other thread counts of these models: 1.0
TRAIN_TARGETS = {("simplenet", 1): 1.5, ("simplenet", 2): 1.5, ("lenet5", 1): 1.1, ("lenet5", 2): 1.0}
EVAL_TARGET = 1.0  # numexp / torch eval images/s, every target model
GEMM_SHARE_TARGET = 0.60  # SimpleNet training GFLOP/s over the GEMM rate measured on the spot
SWEEP_TARGET = 0.55  # wall time of the sweep two at a time over one at a time
TARGET_COLUMNS = ["model", "threads", "metric", "measured", "target", "met"]


def target_rows(rows):
    """One row per engine target that a bench run's ``rows`` measure: the measured value, the target
    (``>= x`` or ``<= x``) and whether it was met. Ratios need torch; models outside
    :data:`DEFAULT_MODELS` have no targets."""
    by_key = {(r["model"], r["threads"], r["framework"]): r for r in rows}
    targets = []

    def add(r, metric, measured, bound, at_most=False):
        if np.isfinite(measured):
            met = measured <= bound if at_most else measured >= bound
            targets.append(dict(model=r["model"], threads=r["threads"], metric=metric, measured=float(measured),
                                target=f"{'<=' if at_most else '>='} {bound:g}", met=bool(met)))

    for (model, threads, framework), r in by_key.items():
        if framework != "numexp" or model not in DEFAULT_MODELS:
            continue
        add(r, "train img/s vs torch", r.get("train_vs_torch", np.nan), TRAIN_TARGETS.get((model, threads), 1.0))
        add(r, "eval img/s vs torch", r.get("eval_vs_torch", np.nan), EVAL_TARGET)
        if model == "simplenet":
            add(r, "share of the GEMM rate in training", r.get("gemm_share", np.nan), GEMM_SHARE_TARGET)
            theirs = by_key.get((model, threads, "torch"), {})
            if "peak_mb" in r and "peak_mb" in theirs:
                add(r, "peak memory, numexp / torch", r["peak_mb"] / theirs["peak_mb"], 1.0, at_most=True)
    return targets


def sweep_target_row(rows):
    """The sweep target's row for :func:`numexp.bench_sweep.bench_sweep`'s rows (its median at n_jobs=2)."""
    two = next(r for r in rows if r["round"] == "median" and r["n_jobs"] == 2)
    return dict(model="sweep of 4 runs", threads=2, metric="wall vs one at a time", measured=two["vs_one_at_a_time"],
                target=f"<= {SWEEP_TARGET:g}", met=bool(two["vs_one_at_a_time"] <= SWEEP_TARGET))


def print_targets(targets):
    if not targets:
        return
    print("\nthe engine's targets (issue: engine speed to the machine's ceiling):")
    print(f"{'model':<16}{'threads':>8}  {'metric':<36}{'measured':>10}  {'target':<8}  met")
    for t in targets:
        print(f"{t['model']:<16}{t['threads']:>8}  {t['metric']:<36}{t['measured']:>10.4g}  {t['target']:<8}  "
              f"{'yes' if t['met'] else 'NO'}")
    missed = sum(not t["met"] for t in targets)
    print(f"{len(targets) - missed} of {len(targets)} met" + (f"; {missed} missed" if missed else ""))


def machine_description(use_torch):
    """CPU, cores, BLAS kernels and library versions: what a quoted table needs beside it."""
    from threadpoolctl import threadpool_info
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    parts = [cpu, f"{os.cpu_count()} CPUs", f"numpy {np.__version__}"]
    parts += [f"{i['internal_api']} {i.get('version') or ''} {i.get('architecture') or ''}".strip()
              for i in threadpool_info() if i["user_api"] == "blas"]
    if use_torch:
        import torch
        parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


# OpenBLAS kernel families compared by --coretypes: what numexp runs with when the user sets nothing
# (numexp's choice, numexp.kernels_choice, or else OpenBLAS's), and the two a user can force with
# $OPENBLAS_CORETYPE (AVX2 and AVX-512)
CORETYPES = (None, "Haswell", "SkylakeX")


def coretype_gemm(coretype, threads):
    """(kernels OpenBLAS reports, float32 GEMM GFLOP/s) in a fresh process with ``$OPENBLAS_CORETYPE``
    set to ``coretype`` (None: unset, so numexp's own choice applies). OpenBLAS reads it once, when NumPy
    is first imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", kernels_choice.MARK)}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    code = ("import json; from threadpoolctl import threadpool_info; from numexp.bench import gemm_gflops; "
            f"g = gemm_gflops({threads}); "
            "a = [i.get('architecture') for i in threadpool_info() if i['user_api'] == 'blas']; "
            "print(json.dumps([a[0] if a else None, g]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def print_coretypes(threads_list):
    """The effect of OpenBLAS's kernel choice on this machine: numexp's default (see
    :mod:`numexp.kernels_choice`, recorded in each run's summary.json) against each forced family."""
    print("OpenBLAS kernels, float32 GEMM 64x4096x3072 in a fresh process:")
    for threads in threads_list:
        for coretype in CORETYPES:
            kernels_used, gflops = coretype_gemm(coretype, threads)
            chosen = f"OPENBLAS_CORETYPE={coretype}" if coretype else "unset (numexp's default)"
            print(f"  {threads} thread(s), {chosen:<28} -> {kernels_used}: {gflops:.1f} GFLOP/s")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m numexp.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(BENCH_MODELS),
                        help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per framework (median reported)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round (at least; see --round-seconds)")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds of rest before each round")
    parser.add_argument("--warmup", type=float, default=0.2,
                        help="seconds of untimed steps after each pause (at least one step)")
    parser.add_argument("--round-seconds", type=float, default=0.5,
                        help="run more than --steps steps in a round if it would be shorter than this")
    parser.add_argument("--no-torch", action="store_true", help="time numexp alone")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer rounds and table")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG charts")
    parser.add_argument("--out", default="results/bench.csv",
                        help="CSV file for the table; the per-layer CSV and the PNGs go beside it")
    parser.add_argument("--coretypes", action="store_true",
                        help="only compare the GEMM rate under numexp's default OpenBLAS kernels and forced Haswell "
                             "(AVX2) / SkylakeX (AVX-512) kernels, each in a fresh process")
    parser.add_argument("--sweep", action="store_true",
                        help="only time a multirun of 4 equal runs with n_jobs=2 against n_jobs=1 (1 BLAS thread "
                             "each); writes bench_sweep.csv beside --out")
    parser.add_argument("--sweep-args", nargs="+",
                        help="the multirun's overrides (default: SimpleConvNet, 4 seeds, MNIST if on disk)")
    parser.add_argument("--optimizers", action="store_true",
                        help="only time one update of each optimizer over SimpleNet's parameters against torch.optim "
                             "at each of --threads; writes bench_optim.csv beside --out")
    parser.add_argument("--memory-probe", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        framework, name, threads, steps = args.memory_probe
        return memory_probe(framework, name, int(threads), int(steps))

    if args.coretypes:
        print_coretypes(args.threads)
        return 0
    if args.sweep:
        sweep_args = args.sweep_args or bench_sweep.default_args()
        rows = bench_sweep.bench_sweep(sweep_args, rounds=max(1, args.rounds // 2))
        for row in rows:
            row["args"] = " ".join(sweep_args)
        bench_sweep.print_sweep(rows, sweep_args)
        print_targets([sweep_target_row(rows)])
        print("wrote " + write_csv(rows, output_paths(args.out)["sweep_csv"], bench_sweep.SWEEP_COLUMNS))
        return 0
    use_torch = have_torch() and not args.no_torch
    if not use_torch and not args.no_torch:
        print("PyTorch is not installed: reporting numexp alone (pip install -e '.[test]' for the comparison)")
    machine = machine_description(use_torch)
    print(f"machine: {machine}")
    plan = Rounds(args.rounds, args.steps, args.pause, args.warmup, args.round_seconds)
    if args.optimizers:
        rows = [row for threads in args.threads
                for row in bench_optim.bench_optimizers(BENCH_MODELS[bench_optim.MODEL], plan, time_rounds,
                                                        paired_ratio, use_torch, threads=threads)]
        bench_optim.print_optimizers(rows)
        print("wrote " + write_csv(rows, output_paths(args.out)["optim_csv"], bench_optim.OPTIM_COLUMNS))
        return 0
    rows, layer_rows = [], []
    for threads in args.threads:
        gemm = gemm_gflops(threads)
        print(f"float32 GEMM 64x4096x3072 at {threads} thread(s): {gemm:.1f} GFLOP/s")
        for name in args.models:
            model_rows, model_layer_rows = bench_model(name, threads, plan, use_torch, layers=not args.no_layers)
            for row in model_rows:
                row["gemm_gflop_s"] = gemm
                row["gemm_share"] = row["train_gflop_s"] / gemm
                if not args.no_memory:
                    row["peak_mb"] = peak_memory_mb(row["framework"], name, threads)
                row["machine"] = machine
                rows.append(row)
            layer_rows += model_layer_rows
    print_table(rows)
    if layer_rows:
        print_layer_table(layer_rows, rounds=args.rounds)
    targets = target_rows(rows)
    print_targets(targets)
    paths = output_paths(args.out)
    written = [write_csv(rows, paths["csv"])]
    if layer_rows:
        written.append(write_csv(layer_rows, paths["layers_csv"], LAYER_COLUMNS))
    if targets:
        written.append(write_csv(targets, paths["targets_csv"], TARGET_COLUMNS))
    if not args.no_plots:
        written.append(plot_ratios(rows, paths["png"]))
        if layer_rows:
            written.append(plot_layers(layer_rows, paths["layers_png"]))
    print("wrote " + ", ".join(written))


# new columns go at the end: scripts and the README read these by name and position
COLUMNS = ["model", "threads", "framework", "train_img_s", "eval_img_s", "train_ms", "train_gflop_s",
           "gemm_gflop_s", "gemm_share", "peak_mb", "train_vs_torch", "eval_vs_torch", "machine"]
LAYER_COLUMNS = ["model", "threads", "layer", "direction", "numexp_ms", "torch_ms"]


def print_table(rows):
    cols = [c for c in COLUMNS if c != "machine" and any(c in r for r in rows)]  # machine: printed once
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>14.2f}" if isinstance(r.get(c), float) else f"{str(r.get(c, '')):>14}" for c in cols))


def _ms(value):
    return f"{value:9.3f}" if np.isfinite(value) else f"{'-':>9}"


def _share(part, whole):
    return f"{100 * part / whole:6.1f}%" if np.isfinite(part) and whole > 0 else f"{'':>7}"


def print_layer_table(layer_rows, rounds):
    """One block per model and thread count: ms per layer and direction, its share of the step, the ratio."""
    for (model, threads), block in _group(layer_rows, ("model", "threads")).items():
        total = next(r for r in block if r["layer"] == "step")
        parts = [r for r in block if r["layer"] != "step"]
        sums = dict(layer="(sum of rows)", direction="", numexp_ms=_finite_sum(r["numexp_ms"] for r in parts),
                    torch_ms=_finite_sum(r["torch_ms"] for r in parts))
        print(f"\n{model}, {threads} thread(s): per-layer ms, median of the instrumented steps of {rounds} rounds")
        print(f"{'layer':<12}{'direction':<18}{'numexp':>9}{'share':>8}{'torch':>9}{'share':>8}{'numexp/torch':>14}")
        for r in parts + [sums, total]:
            ratio = r["numexp_ms"] / r["torch_ms"] if r["torch_ms"] > 0 else float("nan")
            print(f"{r['layer']:<12}{r['direction']:<18}"
                  f"{_ms(r['numexp_ms'])}{_share(r['numexp_ms'], total['numexp_ms'])}"
                  f"{_ms(r['torch_ms'])}{_share(r['torch_ms'], total['torch_ms'])}"
                  f"{(f'{ratio:14.2f}' if np.isfinite(ratio) else ''):>14}")
        for r in block:
            if r.get("note"):
                print(f"note: {r['note']}")
        for framework in ("numexp", "torch"):
            key = f"{framework}_ms"
            # each step is partitioned exactly ("other" is the rest), so medians that do not add up
            # mean the steps themselves varied
            if np.isfinite(total[key]) and abs(sums[key] - total[key]) > 0.1 * total[key]:
                print(f"note: {framework}'s row medians add up to {100 * sums[key] / total[key]:.0f}% of its "
                      f"median step: step times varied (a busy machine?); repeat on a quiet one")


def _finite_sum(values):
    """Sum of the finite values; NaN when there are none (a framework that was not measured)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(sum(finite)) if finite else float("nan")


def _group(rows, keys):
    """Rows grouped by the values of ``keys``, in first-seen order."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def write_csv(rows, path, columns=COLUMNS):
    """Write the ``columns`` present in ``rows`` to ``path`` (floats to 4 significant digits); returns ``path``."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    cols = [c for c in columns if any(c in r for r in rows)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: (f"{r[c]:.4g}" if isinstance(r.get(c), float) else r.get(c)) for c in cols})
    return path


# --------------------------------------------------------------------------- charts

def _figure(width, height):
    """A matplotlib Figure on the Agg canvas, without pyplot's global state or an interactive backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.tight_layout()
    # no Software/date entries: the same numbers give the same bytes
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def plot_ratios(rows, path):
    """Bar chart of numexp/torch train and eval images/s per model and thread count, line at 1.0;
    numexp's images/s instead when torch was not measured. Returns ``path``."""
    ours = [r for r in rows if r["framework"] == "numexp"]
    labels = [f"{r['model']}\n{r['threads']} thread{'s' if r['threads'] > 1 else ''}" for r in ours]
    with_torch = any(np.isfinite(r["train_vs_torch"]) for r in ours)
    keys = ("train_vs_torch", "eval_vs_torch") if with_torch else ("train_img_s", "eval_img_s")
    fig = _figure(max(6.0, 1.3 * len(ours) + 2), 4.5)
    ax = fig.add_subplot()
    x, width = np.arange(len(ours)), 0.38
    for offset, key, label in ((-width / 2, keys[0], "train"), (width / 2, keys[1], "eval")):
        values = [r[key] for r in ours]
        bars = ax.bar(x + offset, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f" if with_torch else "%.0f", fontsize=8)
    if with_torch:
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_ylabel("images/s, numexp / torch")
        ax.set_title("numexp vs PyTorch (above 1: numexp faster), batch 64")
    else:
        ax.set_ylabel("numexp images/s")
        ax.set_title("numexp images/s, batch 64 (PyTorch not measured: no ratio)")
    ax.set_xticks(x, labels, fontsize=8)
    ax.legend()
    return _save(fig, path)


def plot_layers(layer_rows, path):
    """Per-layer ms of a training step, numexp beside torch, forward and backward stacked, one panel per
    model at the highest thread count measured. Returns ``path``."""
    top = max(r["threads"] for r in layer_rows)
    blocks = _group([r for r in layer_rows if r["threads"] == top], ("model",))
    with_torch = any(np.isfinite(r["torch_ms"]) for r in layer_rows)
    fig = _figure(11, 3.6 * len(blocks))
    for i, ((model,), block) in enumerate(blocks.items()):
        ax = fig.add_subplot(len(blocks), 1, i + 1)
        names = list(dict.fromkeys(r["layer"] for r in block if r["layer"] not in ("step", "other")))
        x, width = np.arange(len(names)), 0.38 if with_torch else 0.6
        frameworks = [("numexp", "C0")] + ([("torch", "C1")] if with_torch else [])
        for j, (framework, color) in enumerate(frameworks):
            first, backward = _layer_bars(block, names, f"{framework}_ms")
            offset = (j - (len(frameworks) - 1) / 2) * width
            ax.bar(x + offset, first, width, color=color, label=f"{framework} forward (loss, optimizer: all)")
            ax.bar(x + offset, backward, width, bottom=first, color=color, alpha=0.45,
                   label=f"{framework} backward")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("ms per step")
        ax.set_title(f"{model}, {top} thread{'s' if top > 1 else ''}: time per layer in a training step")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _layer_bars(block, names, column):
    """Per name: the forward (or whole loss/optimizer) ms and the backward ms, missing ones as 0."""
    value = {(r["layer"], r["direction"]): r[column] for r in block}
    first = [value.get((n, "forward"), value.get((n, "forward+backward"), value.get((n, "step"), 0.0)))
             for n in names]
    backward = [value.get((n, "backward"), 0.0) for n in names]
    return np.nan_to_num(first), np.nan_to_num(backward)


if __name__ == "__main__":
    main()
