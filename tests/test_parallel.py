"""Data-parallel replicas: the batch's scores, gradients and BatchNorm statistics, whole or up to a head."""
import json
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from conftest import TINY
from numexp import losses, models, nn, optim, parallel, trainer


def lenet(dtype=np.float64):
    nn.set_default_dtype(dtype)
    try:
        return models.build("lenet5", (1, 32, 32), 10, rng=np.random.default_rng(0), activation="relu", pool="max")
    finally:
        nn.set_default_dtype(np.float32)


def batch(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 32, 32)), rng.integers(0, 10, n)


def grads_of(model):
    return {name: g.copy() for name, g in model.named_grads()}


@pytest.mark.parametrize("transfer", ["pipe", "mailbox", "larger-than-mailbox"])
@pytest.mark.parametrize("replicas, n", [(2, 8), (3, 7), (2, 1), (4, 3)])
def test_scores_and_gradients_are_the_whole_batchs(replicas, n, transfer, monkeypatch):
    """Uneven slices and fewer samples than replicas included; float64, so only rounding differs. The
    arrays travel through the pipe, the shared-memory mailboxes, or the pipe where a mailbox is too small."""
    sent = []
    send = parallel._send
    monkeypatch.setattr(parallel, "_send", lambda conn, header, *args: sent.append(header) or send(conn, header, *args))
    monkeypatch.setattr(parallel, "INLINE_BYTES", 1 << 30 if transfer == "pipe" else 0)
    if transfer == "larger-than-mailbox":
        monkeypatch.setattr(parallel, "MAILBOX_BYTES", 8 * 1024 - 1)  # one sample's image: 8 kB
    x, y = batch(n)
    single, split = lenet(), lenet()
    single.set_input_grad(False)
    split.set_input_grad(False)  # as the trainer: the images need no gradient
    net = parallel.DataParallel(split, replicas)
    try:
        loss = losses.build("softmax")
        expected = single(x)
        single.backward(loss(expected, y)[1])
        scores = net(x)
        assert net.backward(loss(scores, y)[1]) is None
        np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-12)
        ours, theirs = grads_of(split), grads_of(single)
        assert ours.keys() == theirs.keys()
        for name in ours:
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-10, atol=1e-12, err_msg=name)
        images = [header for header in sent if header.get("op") == "forward"]  # 8 kB a sample
        assert bool(images) == (n > 1)  # a batch of one leaves the replicas idle
        assert all(header.get("mailbox", False) == (transfer == "mailbox") for header in images)
    finally:
        net.close()


def test_replicas_share_parameters_so_steps_and_loaded_states_reach_all():
    x, y = batch(6)
    model = lenet()
    net = parallel.DataParallel(model, 2)
    try:
        opt, loss = optim.build("sgd", model, lr=0.1), losses.build("softmax")
        net.backward(loss(net(x), y)[1])
        opt.step()  # in place, in shared memory: the replica computes with the new weights
        np.testing.assert_allclose(net(x), model(x), rtol=1e-12)
        model.load_state_dict(lenet().state_dict())
        net.eval()
        np.testing.assert_allclose(net(x), lenet().eval()(x), rtol=1e-12)  # eval mode reached the replica
        fresh = lenet(); fresh.eval()
        ours, theirs = dict(model.children())["conv1"], dict(fresh.children())["conv1"]
        ours.params["weight"] = theirs.params["weight"] * 2  # a new array, not an in-place change
        theirs.params["weight"] *= 2
        np.testing.assert_allclose(net(x), fresh(x), rtol=1e-12)
    finally:
        net.close()


def test_input_gradient_is_concatenated_when_asked_for():
    x, y = batch(5)
    single, split = lenet(), lenet()
    single.set_input_grad(True)
    split.set_input_grad(True)
    net = parallel.DataParallel(split, 2)
    try:
        loss = losses.build("softmax")
        expected = single.backward(loss(single(x), y)[1])
        np.testing.assert_allclose(net.backward(loss(net(x), y)[1]), expected, rtol=1e-10, atol=1e-14)
    finally:
        net.close()


def bn_net(dtype=np.float64, head=(32,), method="auto", shifted=False):
    """conv-BN-ReLU-pool (a pool-first group), conv-BN-ReLU, then Linear layers with a BatchNorm1d. ``shifted``:
    running statistics with running_mean² > running_var, so that the batch's are summed about the running mean."""
    nn.set_default_dtype(dtype)
    rng = np.random.default_rng(0)
    try:
        layers = [nn.Conv2d(3, 4, 3, padding=1, method=method, rng=rng), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(4, 5, 3, padding=1, method=method, rng=rng), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten()]
        width = 5 * 4 * 4
        for hidden in head:
            layers += [nn.Linear(width, hidden, rng=rng), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        model = nn.Sequential(*layers, nn.Linear(width, 3, rng=rng))
    finally:
        nn.set_default_dtype(np.float32)
    for _, m in model.named_modules():  # statistics and scales away from their defaults
        if isinstance(m, nn._BatchNorm):
            m.params["weight"][:] = rng.uniform(0.5, 1.5, m.num_features)
            m.params["bias"][:] = rng.uniform(-0.5, 0.5, m.num_features)
            m.buffers["running_mean"][:] = rng.uniform(-0.1, 0.1, m.num_features)
            if shifted:
                m.buffers["running_var"][:] = 1e-3
                m.buffers["running_mean"][:] = 0.05
    return model


def bn_batch(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 8, 8)) + 0.5, rng.integers(0, 3, n)


def assert_same_step(single, net, model, x, y):
    """A training step of ``net`` (over ``model``) and of ``single``: same scores, gradients, statistics."""
    loss = losses.build("softmax")
    expected = single(x)
    single.backward(loss(expected, y)[1])
    scores = net(x)
    net.backward(loss(scores, y)[1])
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-12)
    ours, theirs = grads_of(model), grads_of(single)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-9, atol=1e-12, err_msg=name)
    for name, value in single.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[name], value, rtol=1e-12, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("shifted", [False, True], ids=["", "about-the-running-mean"])
@pytest.mark.parametrize("method", ["auto", "winograd"])
@pytest.mark.parametrize("replicas, n", [(2, 8), (3, 7), (2, 3)])
def test_batchnorm_replicas_normalise_with_the_whole_batchs_statistics(replicas, n, method, shifted):
    """Uneven slices; the running statistics are updated once, as by one network on the batch. With
    Winograd convolutions too (on one BLAS thread here as in the replicas; the first into pool blocks), and
    with the batch statistics summed about the running mean (one exchange for both sums)."""
    x, y = bn_batch(n)
    single, model = bn_net(method=method, shifted=shifted), bn_net(method=method, shifted=shifted)
    net = parallel.DataParallel(model, replicas)
    with threadpool_limits(1, user_api="blas"):
        run_batchnorm_steps(single, net, model, x, y)
    assert all(m.sync is None for _, m in model.named_modules() if isinstance(m, nn._BatchNorm))
    convs = [m for _, m in single.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m._cache[1], str) == (method == "winograd") for m in convs)  # ran as Winograd


def run_batchnorm_steps(single, net, model, x, y):
    try:
        for _ in range(2):
            assert_same_step(single, net, model, x, y)
        net.eval()
        np.testing.assert_allclose(net(x), single.eval()(x), rtol=1e-10)
    finally:
        net.close()


def test_a_large_head_runs_here_on_blas_threads_after_replicas_of_the_trunk(monkeypatch):
    monkeypatch.setattr(parallel, "HEAD_PARAMS", 1000)
    monkeypatch.setattr(parallel.blas_idle, "decision", {"timeout": "18"})
    x, y = bn_batch(9)
    single, model = bn_net().set_input_grad(False), bn_net().set_input_grad(False)
    net, layout = parallel.parallelize(model, 2, optim.build("sgd", model, lr=0.1))
    try:
        assert isinstance(net, parallel.TrunkParallel) and layout == {"replicas": 2, "blas_threads": 2, "head": "8"}
        assert list(net.head._children) == ["8", "9", "10", "11"]  # the head's BatchNorm1d runs here
        assert_same_step(single, net, model, x, y)
        assert net.backward(losses.build("softmax")(net(x), y)[1]) is None  # no image gradient asked for
        single.backward(losses.build("softmax")(single(x), y)[1])
        net.eval()
        np.testing.assert_allclose(net(x), single.eval()(x), rtol=1e-10)  # eval mode reached the replica
        net.train()
        assert_same_step(single.train(), net, model, x, y)
    finally:
        net.close()


def test_how_the_cores_are_used(monkeypatch):
    opt = lambda model: optim.build("sgd", model, lr=0.1)  # noqa: E731
    small = lenet(np.float32)
    two, one = opt(small), opt(small)
    net, layout = parallel.parallelize(small, 2, two)
    net.close()
    assert isinstance(net, parallel.DataParallel) and layout == {"replicas": 2, "blas_threads": 1}
    assert parallel.parallelize(small, 1, one) == (small, {"replicas": 1, "blas_threads": 1})
    assert (two.threads, one.threads) == (2, 1)  # the optimizer's update may use every core
    monkeypatch.setattr(parallel.blas_idle, "decision", {"timeout": "18"})
    simplenet = models.build("simplenet", (3, 32, 32), 43, rng=np.random.default_rng(0))
    assert parallel.head_split(simplenet) == "fc1"
    with_bn = bn_net(np.float32)  # a small head: the whole network splits
    assert parallel.head_split(with_bn) is None
    net, layout = parallel.parallelize(with_bn, 2, opt(with_bn))
    net.close()
    assert layout == {"replicas": 2, "blas_threads": 1}
    monkeypatch.setattr(parallel.blas_idle, "decision", {"timeout": None})  # workers would spin
    sgd = opt(simplenet)
    assert parallel.parallelize(simplenet, 2, sgd) == (simplenet, {"replicas": 1, "blas_threads": 2})
    assert simplenet["fc1"].fused_update is not None  # one process: FC1 updates inside backward


@pytest.mark.parametrize("extra", [nn.Dropout(0.5, rng=np.random.default_rng(0)), "fused"])
def test_dropout_and_fused_updates_stay_in_one_process(extra):
    model = models.build("mlp", (1, 64, 64), 10, hidden=[1024], rng=np.random.default_rng(0))
    if extra == "fused":
        assert optim.build("sgd", model, lr=0.1).fuse_into_backward() == 1
    else:
        model.add_module("extra", extra)
    assert not parallel.can_split(model)
    with pytest.raises(ValueError, match="Dropout or fused"):
        parallel.DataParallel(model, 2)
    small = lenet(np.float32)
    optim.build("sgd", small, lr=0.1).fuse_into_backward()  # LeNet's layers are too small to fuse
    assert parallel.can_split(small)


def fail_on_marked_samples(layer):
    """Make ``layer.forward`` raise on an input with a NaN (a marked sample); returns the plain one.
    Call it before the fork, so that the replicas have it too."""
    plain = layer.forward

    def forward(x):
        if np.isnan(x).any():
            raise ValueError("a marked sample")
        return plain(x)

    layer.forward = forward
    return plain


def test_an_error_in_a_replica_reaches_the_caller_and_the_next_call_works():
    model = lenet()
    fail_on_marked_samples(dict(model.children())["conv1"])  # here only the replica's slice is marked
    net = parallel.DataParallel(model, 2)
    try:
        x, _ = batch(4)
        x[3, 0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="a marked sample .in data-parallel replica 1"):
            net(x)
        x[3, 0, 0, 0] = 0
        assert net(x).shape == (4, 10)
    finally:
        net.close()


@pytest.mark.parametrize("marked, raised_in", [((0,), ""), ((3,), "replica 1"), ((5,), "replica 2"),
                                               ((1, 4), "")])
def test_a_failure_before_the_batchnorm_sums_releases_the_others(marked, raised_in):
    """Three slices of two samples; whoever fails first (the caller's slice is the first), the others,
    waiting for BatchNorm's totals, are released, the error is the first slice's, and the next step
    is in step again."""
    model = bn_net()
    conv1 = model[0]
    plain = fail_on_marked_samples(conv1)
    net = parallel.DataParallel(model, 3)
    try:
        x, y = bn_batch(6)
        bad = x.copy()
        bad[list(marked), 0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="a marked sample" + (f" .in data-parallel {raised_in}" if raised_in else "$")):
            net(bad)
        conv1.forward = plain
        assert_same_step(bn_net(), net, model, x, y)
    finally:
        net.close()


def test_an_interrupted_caller_closes_replicas_that_wait_for_batchnorm_sums():
    model = bn_net()
    net = parallel.DataParallel(model, 2)
    try:
        def interrupted(x):  # after the fork: only the caller's slice is interrupted (Ctrl-C)
            raise KeyboardInterrupt
        model[0].forward = interrupted
        with pytest.raises(KeyboardInterrupt):
            net(bn_batch(4)[0])
    finally:
        process = net.replicas[0].process
        start = time.perf_counter()
        net.close()
    assert process.exitcode == 0 and time.perf_counter() - start < 2  # it stopped, it was not killed


def test_replicas_run_in_the_callers_numpy_error_state():
    net = parallel.DataParallel(lenet(np.float32), 2)
    try:
        x = batch(4)[0].astype(np.float32)
        x[2:] = 3e38  # overflows in the replica's half only
        with np.errstate(over="raise", invalid="raise"), pytest.raises(FloatingPointError, match="replica 1"):
            net(x)
        with np.errstate(all="ignore"):
            assert np.isnan(net(x)[2:]).all()
    finally:
        net.close()


def test_a_replica_that_dies_is_reported_with_the_way_out():
    net = parallel.DataParallel(lenet(), 2)
    try:
        x, _ = batch(4)
        net(x)
        process = net.replicas[0].process
        process.kill()
        process.join()
        with pytest.raises(parallel.ReplicaError, match="replica 1 .* died .*threads=1"):
            net(x)
    finally:
        net.close()


def test_close_ends_the_replica_processes():
    net = parallel.DataParallel(lenet(), 3)
    processes = [replica.process for replica in net.replicas]
    assert len(processes) == 2 and all(p.is_alive() for p in processes)
    net.close()
    assert not any(p.is_alive() for p in processes)
    assert [p.exitcode for p in processes] == [0, 0]


def test_trainer_runs_replicas_on_two_threads_reproducibly(compose_cfg, tmp_path):
    """threads=2 on an MLP without dropout: two replicas, BLAS on one thread, recorded; the same
    numbers twice, and the same as one thread up to float rounding."""
    results = {}
    for name, threads in (("a", 2), ("b", 2), ("one", 1)):
        cfg = compose_cfg([*TINY, "epochs=2", f"threads={threads}"])
        summary = trainer.train(cfg, out_dir=tmp_path / name)
        assert summary["status"] == "completed", summary["error"]
        results[name] = json.loads((tmp_path / name / "summary.json").read_text())
        results[name]["metrics"] = (tmp_path / name / "metrics.csv").read_text().splitlines()
    two = results["a"]
    assert two["parallel"] == {"replicas": 2, "blas_threads": 1}
    assert two["allocator"]["by"] in ("numexp", "user", "libc") and two["allocator"]["reason"]
    assert [b["num_threads"] for b in two["blas"]] == [1] * len(two["blas"])
    assert results["one"]["parallel"] == {"replicas": 1, "blas_threads": 1}
    strip = [[",".join(line.split(",")[:-1]) for line in results[n]["metrics"]] for n in ("a", "b")]
    assert strip[0] == strip[1]
    assert two["val_acc"] == pytest.approx(results["one"]["val_acc"], abs=0.02)


@pytest.mark.parametrize("head_params", [parallel.HEAD_PARAMS, 1000])
def test_trainer_runs_batchnorm_networks_on_replicas_reproducibly(compose_cfg, tmp_path, monkeypatch, head_params):
    """SimpleNet on the digits at threads=2: its small head (8x8 images) makes it all replicas; with a
    lower bar, replicas up to FC1 and the head on BLAS threads. The same numbers twice, and the
    same as one thread up to float rounding (BatchNorm's statistics are the whole batch's)."""
    monkeypatch.setattr(parallel, "HEAD_PARAMS", head_params)
    monkeypatch.setattr(parallel.blas_idle, "decision", {"timeout": "18"})
    results = {}
    for name, threads in (("a", 2), ("b", 2), ("one", 1)):
        cfg = compose_cfg(["model=simplenet", "optim=sgd", "lr=0.01", "schedule=fixed", "epochs=2", "batch_size=64",
                           f"threads={threads}"])
        summary = trainer.train(cfg, out_dir=tmp_path / name)
        assert summary["status"] == "completed", summary["error"]
        results[name] = json.loads((tmp_path / name / "summary.json").read_text())
        results[name]["metrics"] = (tmp_path / name / "metrics.csv").read_text().splitlines()
    expected = {"replicas": 2, "blas_threads": 1} if head_params > 1000 else {"replicas": 2, "blas_threads": 2,
                                                                            "head": "fc1"}
    assert results["a"]["parallel"] == expected
    strip = [[",".join(line.split(",")[:-1]) for line in results[n]["metrics"]] for n in ("a", "b")]
    assert strip[0] == strip[1]
    one = [line.split(",") for line in results["one"]["metrics"][1:]]
    two = [line.split(",") for line in results["a"]["metrics"][1:]]
    header = results["one"]["metrics"][0].split(",")
    loss = header.index("train_loss")
    for row_one, row_two in zip(one, two):
        assert float(row_two[loss]) == pytest.approx(float(row_one[loss]), rel=1e-3)
