"""Engine benchmark: numexp against the same network in PyTorch, in one process.

    python -m numexp.bench                       # simplenet + lenet5 + simple_convnet, 1 and 2 threads
    python -m numexp.bench --models simplenet --threads 2 --out results/bench.csv

For each model and thread count it times a training step (forward + loss + backward + SGD
step, batch 64, float32) and an eval forward pass, in settled rounds that alternate which
framework goes first (OpenBLAS threads spin for a while after a call and slow whatever runs
next), and reports medians, the ratio numexp/torch, the achieved GFLOP/s against a plain
float32 GEMM measured on the spot, and each framework's peak memory (in a fresh process).
Without torch installed it reports numexp alone.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from numexp import losses, models, nn, optim

BENCH_MODELS = {
    "simplenet": dict(in_shape=(3, 32, 32), num_classes=43, options={}),
    "lenet5": dict(in_shape=(1, 32, 32), num_classes=10, options={"activation": "relu", "pool": "max"}),
    "simple_convnet": dict(in_shape=(1, 28, 28), num_classes=10, options={}),
}
BATCH = 64


def have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def step_flops(model, batch):
    """FLOPs (2 per multiply-add) of one training step: the GEMMs of forward, and twice that for backward.

    Conv sizes are read off an im2col forward pass on one sample, so nested blocks count too.
    """
    model.eval()
    model(np.zeros((1,) + model.in_shape, dtype=np.float32))
    macs = 0
    for _, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            macs += layer.in_features * layer.out_features
        elif isinstance(layer, nn.Conv2d):
            rows, cols = layer._cache[1].shape
            macs += rows * cols * layer.out_channels
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
    def __init__(self, name, spec, rng):
        self.model = models.build(name, spec["in_shape"], spec["num_classes"], rng=rng, **spec["options"])
        self.model.set_input_grad(False)  # as torch, which needs no gradient for a plain input tensor
        self.loss = losses.build("softmax")
        self.opt = optim.build("sgd", self.model, lr=1e-3)

    def train_step(self, x, y):
        self.model.train()
        _, dscores = self.loss(self.model(x), y)
        self.model.backward(dscores)
        self.opt.step()

    def eval_step(self, x):
        self.model.eval()
        self.model(x)


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


def time_rounds(runners, rounds, steps, pause):
    """Median seconds per call of each (label, fn) in ``runners``, alternating who goes first."""
    times = {label: [] for label, _ in runners}
    for r in range(rounds):
        order = runners if r % 2 == 0 else runners[::-1]
        for label, fn in order:
            time.sleep(pause)  # let spinning BLAS threads of the previous round settle
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[label].append((time.perf_counter() - t) / steps)
    return {label: float(np.median(v)) for label, v in times.items()}


def bench_model(name, threads, rounds, steps, pause, use_torch):
    """One row per framework: train and eval images/s for ``name`` at ``threads`` threads."""
    spec = BENCH_MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH,) + spec["in_shape"], dtype=np.float32)
    y = rng.integers(0, spec["num_classes"], BATCH)
    ours = NumexpRunner(name, spec, rng)
    train = [("numexp", lambda: ours.train_step(x, y))]
    evals = [("numexp", lambda: ours.eval_step(x))]
    if use_torch:
        import torch
        torch.set_num_threads(threads)
        theirs = TorchRunner(ours.model)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        train.append(("torch", lambda: theirs.train_step(tx, ty)))
        evals.append(("torch", lambda: theirs.eval_step(tx)))
    with threadpool_limits(threads):
        for _, fn in train + evals:  # warm-up: first calls allocate and load kernels
            fn(), fn()
        train_s = time_rounds(train, rounds, steps, pause)
        eval_s = time_rounds(evals, rounds, steps, pause)
    flops = step_flops(ours.model, BATCH)
    return [dict(model=name, threads=threads, framework=label,
                 train_img_s=BATCH / train_s[label], eval_img_s=BATCH / eval_s[label],
                 train_ms=1000 * train_s[label], train_gflop_s=flops / train_s[label] / 1e9)
            for label in train_s]


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
    runner = NumexpRunner(name, spec, rng)
    if framework == "torch":
        runner = TorchRunner(runner.model)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    with threadpool_limits(threads):
        for _ in range(steps):
            runner.train_step(x, y)
    print(json.dumps({"peak_mb": (_rss_kb("VmHWM") - base) / 1024}))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m numexp.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=list(BENCH_MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per framework (median reported)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds of rest before each round")
    parser.add_argument("--no-torch", action="store_true", help="time numexp alone")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--out", default="results/bench.csv", help="CSV file for the table")
    parser.add_argument("--memory-probe", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        framework, name, threads, steps = args.memory_probe
        return memory_probe(framework, name, int(threads), int(steps))

    use_torch = have_torch() and not args.no_torch
    if not use_torch and not args.no_torch:
        print("PyTorch is not installed: reporting numexp alone (pip install -e '.[test]' for the comparison)")
    rows = []
    for threads in args.threads:
        gemm = gemm_gflops(threads)
        print(f"float32 GEMM 64x4096x3072 at {threads} thread(s): {gemm:.1f} GFLOP/s")
        for name in args.models:
            for row in bench_model(name, threads, args.rounds, args.steps, args.pause, use_torch):
                row["gemm_gflop_s"] = gemm
                row["gemm_share"] = row["train_gflop_s"] / gemm
                if not args.no_memory:
                    row["peak_mb"] = peak_memory_mb(row["framework"], name, threads)
                rows.append(row)
    add_ratios(rows)
    print_table(rows)
    write_csv(rows, args.out)
    print(f"wrote {args.out}")


def add_ratios(rows):
    """numexp's train/eval ratio to torch on the same model and thread count (1.0 where torch is absent)."""
    torch_rows = {(r["model"], r["threads"]): r for r in rows if r["framework"] == "torch"}
    for r in rows:
        ref = torch_rows.get((r["model"], r["threads"]))
        r["train_vs_torch"] = r["train_img_s"] / ref["train_img_s"] if ref else float("nan")
        r["eval_vs_torch"] = r["eval_img_s"] / ref["eval_img_s"] if ref else float("nan")


COLUMNS = ["model", "threads", "framework", "train_img_s", "eval_img_s", "train_ms", "train_gflop_s",
           "gemm_gflop_s", "gemm_share", "peak_mb", "train_vs_torch", "eval_vs_torch"]


def print_table(rows):
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>14.2f}" if isinstance(r.get(c), float) else f"{str(r.get(c, '')):>14}" for c in cols))


def write_csv(rows, path):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: (f"{r[c]:.4g}" if isinstance(r.get(c), float) else r.get(c)) for c in cols})


if __name__ == "__main__":
    main()
