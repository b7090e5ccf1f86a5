"""Data-parallel replicas: the batch's scores and gradients, for networks whose samples do not interact."""
import json

import numpy as np
import pytest

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


@pytest.mark.parametrize("replicas, n", [(2, 8), (3, 7), (2, 1), (4, 3)])
def test_scores_and_gradients_are_the_whole_batchs(replicas, n):
    """Uneven slices and fewer samples than replicas included; float64, so only rounding differs."""
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


@pytest.mark.parametrize("extra", [nn.BatchNorm1d(10), nn.Dropout(0.5, rng=np.random.default_rng(0))])
def test_networks_whose_samples_interact_stay_whole(extra):
    model = lenet()
    model.add_module("extra", extra)
    assert not parallel.can_split(model)
    assert parallel.workers_for(model, 2) == (1, 2)
    with pytest.raises(ValueError, match="BatchNorm, Dropout or fused"):
        parallel.DataParallel(model, 2)


def test_fused_updates_and_one_thread_stay_whole():
    model = models.build("simplenet", (3, 32, 32), 43, rng=np.random.default_rng(0))
    assert parallel.workers_for(model, 2) == (1, 2)  # BatchNorm
    small = lenet(np.float32)
    assert parallel.workers_for(small, 1) == (1, 1)
    assert parallel.workers_for(small, 2) == (2, 1)
    optim.build("sgd", small, lr=0.1).fuse_into_backward()  # LeNet's layers are too small to fuse
    assert parallel.can_split(small)
    mlp = models.build("mlp", (1, 64, 64), 10, hidden=[1024], rng=np.random.default_rng(0))
    assert optim.build("sgd", mlp, lr=0.1).fuse_into_backward() == 1
    assert not parallel.can_split(mlp)


def test_an_error_in_a_replica_reaches_the_caller_and_the_next_call_works():
    model = lenet()
    conv1 = dict(model.children())["conv1"]
    plain = conv1.forward

    def forward(x):  # fails on the samples marked with a NaN: here, only the replica's
        if np.isnan(x).any():
            raise ValueError("a marked sample")
        return plain(x)

    conv1.forward = forward  # before the fork, so the replica has it too
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
