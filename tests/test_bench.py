"""``python -m numexp.bench`` in miniature: the files it writes and their structure, never its timings."""
import csv
import math
import struct
import time

import numpy as np
import pytest

from numexp import bench, kernels_choice, models, nn

MODEL = "simple_convnet"  # the cheapest bench model: a tiny run takes well under a second
TINY = ["--models", MODEL, "--threads", "1", "--rounds", "1", "--steps", "1", "--pause", "0", "--warmup", "0",
        "--round-seconds", "0", "--no-memory"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_bench(tmp_path, monkeypatch):
    """``run_bench(*extra_args)``: bench.main with the tiny settings, writing into ``tmp_path``; returns it."""
    # the on-the-spot GEMM multiplies 50 MB matrices 21 times; its value plays no part in the structure
    monkeypatch.setattr(bench, "gemm_gflops", lambda threads: 100.0)
    torch = _torch_or_none()
    threads_before = torch.get_num_threads() if torch else None

    def _run(*extra):
        bench.main(TINY + ["--out", str(tmp_path / "bench.csv"), *extra])
        return tmp_path

    yield _run
    if torch:  # the bench sets torch's global thread count; later tests should not inherit it
        torch.set_num_threads(threads_before)


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def png_chunks(path):
    """Chunk types of a PNG file, checking the signature and each chunk's length on the way."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append(kind.decode("ascii"))
        pos += 12 + length
    assert pos == len(data)
    return chunks


def assert_valid_png(path):
    chunks = png_chunks(path)
    assert chunks[0] == "IHDR" and chunks[-1] == "IEND" and "IDAT" in chunks
    assert "tIME" not in chunks and "tEXt" not in chunks  # no timestamp or software stamp: reproducible bytes


def expected_layer_keys(grouped=True):
    """(layer, direction) of every per-layer row the tiny model must get; ``grouped``: numexp's rows."""
    model = bench.NumexpRunner(MODEL, bench.BENCH_MODELS[MODEL], np.random.default_rng(0)).model
    names = [name for name, _ in model.children()]
    # numexp runs ReLU -> MaxPool2d as one pool-first step (numexp.nn.PoolFirst): one row for the pair
    pairs = [(a, b) for a, b in zip(names, names[1:]) if a.startswith("relu") and b.startswith("pool")]
    for relu, pool in pairs if grouped else []:
        names[names.index(relu):names.index(pool) + 1] = [f"{relu}+{pool}"]
    keys = {(n, d) for n in names for d in ("forward", "backward")}
    return keys | {("loss", "forward+backward"), ("optimizer", "step"), ("other", "between layers"),
                   ("step", "total")}


def test_with_torch_writes_both_tables_and_charts(run_bench, capsys):
    pytest.importorskip("torch")
    out = run_bench()

    columns, rows = read_csv(out / "bench.csv")
    assert columns == ["model", "threads", "framework", "train_img_s", "eval_img_s", "train_ms", "train_gflop_s",
                       "gemm_gflop_s", "gemm_share", "train_vs_torch", "eval_vs_torch", "machine"]
    assert [(r["model"], r["threads"], r["framework"]) for r in rows] == [(MODEL, "1", "numexp"), (MODEL, "1", "torch")]
    assert all(math.isfinite(float(r["train_vs_torch"])) for r in rows)

    columns, layer_rows = read_csv(out / "bench_layers.csv")
    assert columns == ["model", "threads", "layer", "direction", "numexp_ms", "torch_ms"]
    assert {(r["layer"], r["direction"]) for r in layer_rows} == expected_layer_keys()
    assert len(layer_rows) == len(expected_layer_keys())
    assert all(r["model"] == MODEL and r["threads"] == "1" for r in layer_rows)
    for r in layer_rows:  # every row measured in both frameworks (values not judged)
        assert math.isfinite(float(r["numexp_ms"])) and math.isfinite(float(r["torch_ms"])), r

    assert_valid_png(out / "bench.png")
    assert_valid_png(out / "bench_layers.png")
    columns, targets = read_csv(out / "bench_targets.csv")  # values and verdicts not judged
    assert columns == ["model", "threads", "metric", "measured", "target", "met"]
    assert [(t["model"], t["threads"], t["metric"], t["target"]) for t in targets] == [
        (MODEL, "1", "train img/s vs torch", ">= 1"), (MODEL, "1", "eval img/s vs torch", ">= 1")]
    assert all(t["met"] in ("True", "False") for t in targets)
    printed = capsys.readouterr().out
    assert f"{MODEL}, 1 thread(s): per-layer ms" in printed
    assert "(sum of rows)" in printed and "machine: " in printed
    assert "the engine's targets" in printed and " of 2 met" in printed


def test_without_torch_reports_numexp_alone(run_bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "have_torch", lambda: False)
    out = run_bench()

    _, rows = read_csv(out / "bench.csv")
    assert [r["framework"] for r in rows] == ["numexp"]
    assert math.isnan(float(rows[0]["train_vs_torch"])) and math.isnan(float(rows[0]["eval_vs_torch"]))
    _, layer_rows = read_csv(out / "bench_layers.csv")
    assert {(r["layer"], r["direction"]) for r in layer_rows} == expected_layer_keys()
    assert all(math.isfinite(float(r["numexp_ms"])) and math.isnan(float(r["torch_ms"])) for r in layer_rows)
    assert_valid_png(out / "bench.png")
    assert_valid_png(out / "bench_layers.png")
    assert not (out / "bench_targets.csv").exists()  # SimpleConvNet's targets are all ratios to torch
    assert "PyTorch is not installed" in capsys.readouterr().out


def test_models_outside_the_targets_run_on_request_residual_blocks_as_one_row(run_bench):
    """``--models lenet5_classic resnet_small``: the classic LeNet-5 built from model=lenet5's defaults
    (sigmoid, average pooling), resnet_small timed with each residual block as one per-layer row."""
    pytest.importorskip("torch")
    out = run_bench("--models", "lenet5_classic", "resnet_small", "--no-plots")
    _, rows = read_csv(out / "bench.csv")
    assert [(r["model"], r["framework"]) for r in rows] == [
        ("lenet5_classic", "numexp"), ("lenet5_classic", "torch"), ("resnet_small", "numexp"), ("resnet_small", "torch")]
    assert all(math.isfinite(float(r["train_vs_torch"])) and float(r["train_gflop_s"]) > 0 for r in rows)
    _, layer_rows = read_csv(out / "bench_layers.csv")
    layers = {(r["model"], r["layer"]) for r in layer_rows}
    assert {("lenet5_classic", "act1"), ("lenet5_classic", "pool1"), ("resnet_small", "layer1")} <= layers
    assert all(math.isfinite(float(r["numexp_ms"])) and math.isfinite(float(r["torch_ms"])) for r in layer_rows)
    runner = bench.NumexpRunner("lenet5_classic", bench.BENCH_MODELS["lenet5_classic"], np.random.default_rng(0))
    assert isinstance(runner.model["act1"], nn.Sigmoid) and isinstance(runner.model["pool1"], nn.AvgPool2d)


def test_no_layers_and_no_plots_write_only_the_main_table(run_bench):
    out = run_bench("--no-torch", "--no-layers", "--no-plots")
    assert sorted(p.name for p in out.iterdir()) == ["bench.csv"]


def test_numexp_clock_leaves_the_model_as_it_found_it():
    runner = bench.NumexpRunner(MODEL, bench.BENCH_MODELS[MODEL], np.random.default_rng(0))
    x = np.zeros((2,) + bench.BENCH_MODELS[MODEL]["in_shape"], dtype=np.float32)
    with bench.NumexpLayerClock(runner) as clock:
        clock.train_step(x, np.array([0, 1]))
    assert len(clock.times.steps) == 1
    for _, layer in runner.model.children():
        assert "forward" not in vars(layer) and "backward" not in vars(layer)
    assert nn.PoolFirst.forward.__qualname__ == "PoolFirst.forward"  # the class is unpatched too


def test_torch_clock_removes_its_hooks():
    pytest.importorskip("torch")
    import torch
    runner = bench.NumexpRunner(MODEL, bench.BENCH_MODELS[MODEL], np.random.default_rng(0))
    theirs = bench.TorchRunner(runner.model)
    x = torch.zeros((2,) + bench.BENCH_MODELS[MODEL]["in_shape"])
    with bench.TorchLayerClock(theirs) as clock:
        clock.train_step(x, torch.tensor([0, 1]))
    assert {key for key in clock.times.steps[0]} == expected_layer_keys(grouped=False)
    for module in theirs.model.children():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_coretypes_forces_openblas_kernels_in_a_fresh_process_only():
    """The bench shows numexp's default kernels against each forced family, without touching its own."""
    import os

    before = os.environ.get("OPENBLAS_CORETYPE")
    forced, gflops = bench.coretype_gemm("SkylakeX", 1)
    assert forced == "SkylakeX" and gflops > 0
    default, _ = bench.coretype_gemm(None, 1)
    assert default == (kernels_choice.fresh_process_choice() or default)
    assert os.environ.get("OPENBLAS_CORETYPE") == before


def test_sweep_times_both_launch_modes_and_reads_every_run(run_bench, capsys):
    """``--sweep``: a real multirun per n_jobs (tiny runs on digits here), one row per round and mode,
    the medians, and the ratio to one at a time."""
    args = ["data=digits", "model=softmax_regression", "epochs=1", "max_steps=2", "seed=0,1", "threads=1"]
    folder = run_bench("--sweep", "--sweep-args", *args)
    columns, rows = read_csv(folder / "bench_sweep.csv")
    assert columns == ["round", "n_jobs", "runs", "wall_s", "run_wall_sum_s", "overhead_s", "vs_one_at_a_time", "args"]
    assert [(r["round"], r["n_jobs"]) for r in rows] == [("0", "1"), ("0", "2"), ("median", "1"), ("median", "2")]
    assert all(r["runs"] == "2" and float(r["wall_s"]) > float(r["run_wall_sum_s"]) / 2 > 0 for r in rows)
    # what the sweep adds around its runs: the wall time less the runs' own, shared by n_jobs
    assert all(float(r["overhead_s"]) == pytest.approx(float(r["wall_s"]) - float(r["run_wall_sum_s"]) / int(r["n_jobs"]),
                                                       abs=0.01) for r in rows[:2])  # CSV keeps 4 digits
    assert float(rows[2]["vs_one_at_a_time"]) == 1.0 and rows[0]["args"] == " ".join(args)
    printed = capsys.readouterr().out
    assert "two at a time:" in printed and "wall vs one at a time" in printed and "s two at a time" in printed
    assert not (folder / "bench.csv").exists()  # only the sweep table


def test_sweep_failure_names_the_command_and_the_cause(tmp_path):
    from numexp import bench_sweep
    with pytest.raises(RuntimeError, match=r"(?s)the sweep failed \(exit 1\).*numexp -m lr=-1.*must be > 0"):
        bench_sweep.time_sweep(["lr=-1", "seed=0,1"], 1, tmp_path / "sweep")


def test_ratio_pairs_the_rounds_so_a_drifting_machine_cancels_out():
    # the machine slows down 3x over the rounds; numexp is 1.5x faster in every round
    drift = np.array([1.0, 1.5, 2.0, 3.0, 3.0])
    times = {"numexp": list(2.0 * drift), "torch": list(3.0 * drift)}
    assert bench.paired_ratio(times, "numexp") == pytest.approx(1.5)
    assert bench.paired_ratio(times, "torch") == 1.0
    assert math.isnan(bench.paired_ratio({"numexp": [1.0]}, "numexp"))  # no torch: no ratio


def test_a_round_of_short_steps_lasts_round_seconds_and_reports_time_per_step():
    calls = {"fast": 0, "slow": 0}

    def step(label, seconds):
        def fn():
            calls[label] += 1
            target = time.perf_counter() + seconds
            while time.perf_counter() < target:
                pass
        return fn

    times = bench.time_rounds([("fast", step("fast", 0.001)), ("slow", step("slow", 0.02))],
                              bench.Rounds(rounds=2, steps=3, pause=0, warmup=0.005, seconds=0.03))
    # fast: ~30 timed steps a round (plus the untimed ones); slow: its 3 steps already last 60 ms
    assert 2 * 30 <= calls["fast"] <= 2 * (30 + 8 + 2)
    assert calls["slow"] == 2 * (3 + 2)  # one untimed step, one warm-up step, three timed
    # seconds per step, not per round (loose bounds: a busy host only makes steps longer)
    assert all(0.001 <= t < 0.01 for t in times["fast"]), times
    assert all(0.02 <= t < 0.06 for t in times["slow"]), times


def test_optimizers_times_every_registered_optimizer_against_torch(run_bench, capsys):
    from numexp import bench_optim, optim
    folder = run_bench("--optimizers")
    columns, rows = read_csv(folder / "bench_optim.csv")
    assert columns == bench_optim.OPTIM_COLUMNS
    assert [r["optimizer"] for r in rows] == list(optim.OPTIMIZERS)
    with_torch = _torch_or_none() is not None
    for r in rows:
        assert int(r["params"]) > 12_000_000 and float(r["numexp_ms"]) > 0
        assert (float(r["torch_ms"]) > 0) if with_torch else math.isnan(float(r["torch_ms"]))
    assert "one update of SimpleNet's" in capsys.readouterr().out
    assert not (folder / "bench.csv").exists()


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_the_optimizer_bench_pits_each_rule_against_the_same_rule_in_torch(name):
    torch = pytest.importorskip("torch")
    from numexp import bench_optim, models, optim
    from numexp.bench_optim import TORCH_OPTIMIZERS
    rng = np.random.default_rng(0)
    model = models.build("simple_convnet", (1, 12, 12), 3, rng=rng, filters=4, hidden=8)
    for _, module in model.named_modules():
        module.grads = {k: rng.standard_normal(p.shape, dtype=np.float32) for k, p in module.params.items()}
    module = bench_optim.torch_copy(model)
    cls, options = TORCH_OPTIMIZERS[name]
    ours, theirs = optim.build(name, model, lr=0.01), getattr(torch.optim, cls)(module.parameters(), lr=0.01, **options)
    for _ in range(3):
        ours.step()
        theirs.step()
    mine = dict(model.named_params())
    for key, p in module.named_parameters():
        np.testing.assert_allclose(mine[key], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name, in_shape, classes, macs", [
    # conv1 32*32*32*27 + conv2 16*16*64*288 + fc1 4096*3072 + fc2 3072*43
    ("simplenet", (3, 32, 32), 43, 884_736 + 4_718_592 + 12_582_912 + 132_096),
    # stem 784*16*9, three 3x3 convs with 16*9 or 32*9 inputs per output, stride-2 conv, 1x1 projection, fc
    ("resnet_small", (1, 28, 28), 10, 112_896 + 3 * 1_806_336 + 903_168 + 100_352 + 320),
    ("simple_convnet", (1, 28, 28), 10, 24 * 24 * 30 * 25 + 4320 * 100 + 100 * 10),
])
def test_step_flops_count_every_multiply_add_nested_layers_too(name, in_shape, classes, macs):
    """3 GEMM passes (forward, input and weight gradients) of 2 FLOPs per multiply-add, whatever each
    convolution's unfold method (im2col, whose eval pass keeps no unfold, batch-last) or nesting."""
    model = models.build(name, in_shape, classes, rng=np.random.default_rng(0))
    assert bench.step_flops(model, 64) == 3 * 2 * macs * 64


def bench_row(model, threads, framework, **values):
    return dict(model=model, threads=threads, framework=framework, **values)


def test_targets_judge_each_measured_target_at_its_own_bound():
    rows = [bench_row("simplenet", 1, "numexp", train_vs_torch=1.499, eval_vs_torch=1.6, gemm_share=0.6, peak_mb=150.0),
            bench_row("simplenet", 1, "torch", train_vs_torch=1.0, eval_vs_torch=1.0, gemm_share=0.4, peak_mb=330.0),
            bench_row("lenet5", 1, "numexp", train_vs_torch=1.1, eval_vs_torch=0.99),
            bench_row("lenet5", 2, "numexp", train_vs_torch=1.0, eval_vs_torch=1.0),
            bench_row("simple_convnet", 4, "numexp", train_vs_torch=0.999, eval_vs_torch=2.0),
            bench_row("resnet_small", 1, "numexp", train_vs_torch=0.7, eval_vs_torch=0.5)]  # no targets
    got = {(t["model"], t["threads"], t["metric"]): (t["target"], t["met"]) for t in bench.target_rows(rows)}
    assert got == {
        ("simplenet", 1, "train img/s vs torch"): (">= 1.5", False),
        ("simplenet", 1, "eval img/s vs torch"): (">= 1", True),
        ("simplenet", 1, "share of the GEMM rate in training"): (">= 0.6", True),
        ("simplenet", 1, "peak memory, numexp / torch"): ("<= 1", True),
        ("lenet5", 1, "train img/s vs torch"): (">= 1.1", True),
        ("lenet5", 1, "eval img/s vs torch"): (">= 1", False),
        ("lenet5", 2, "train img/s vs torch"): (">= 1", True),
        ("lenet5", 2, "eval img/s vs torch"): (">= 1", True),
        ("simple_convnet", 4, "train img/s vs torch"): (">= 1", False),
        ("simple_convnet", 4, "eval img/s vs torch"): (">= 1", True),
    }


def test_targets_without_torch_keep_only_what_numexp_measures_alone(capsys):
    rows = [bench_row("simplenet", 2, "numexp", train_vs_torch=math.nan, eval_vs_torch=math.nan, gemm_share=0.55,
                      peak_mb=220.0)]
    targets = bench.target_rows(rows)
    assert [(t["metric"], t["met"]) for t in targets] == [("share of the GEMM rate in training", False)]
    bench.print_targets(targets)
    assert "0 of 1 met; 1 missed" in capsys.readouterr().out


def test_sweep_target_reads_the_median_two_at_a_time():
    rows = [dict(round=0, n_jobs=2, vs_one_at_a_time=0.5), dict(round="median", n_jobs=1, vs_one_at_a_time=1.0),
            dict(round="median", n_jobs=2, vs_one_at_a_time=0.56)]
    row = bench.sweep_target_row(rows)
    assert (row["measured"], row["target"], row["met"]) == (0.56, "<= 0.55", False)
