"""Models build from the input shape, refuse inputs they cannot fit, keep float32, and train."""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from numexp import blas, losses, models, nn, optim


@pytest.fixture(scope="module")
def digits():
    """sklearn's digits, normalised, shuffled with a fixed seed: (x_train, y_train, x_test, y_test)."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], d.target[order]
    x = (x - x[:1400].mean()) / x[:1400].std()
    return x[:1400], y[:1400], x[1400:], y[1400:]


def upsample_to_28(x):
    """8x8 -> 24x24 by repeating each pixel 3x3, then 2 pixels of zero padding -> 28x28."""
    big = np.repeat(np.repeat(x, 3, axis=2), 3, axis=3)
    return np.pad(big, ((0, 0), (0, 0), (2, 2), (2, 2)))


def fit(model, x, y, opt, epochs, batch_size=32, seed=1):
    loss_fn, rng = losses.build("softmax"), np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch_size):
            b = order[i:i + batch_size]
            _, dscores = loss_fn(model(x[b]), y[b])
            model.backward(dscores)
            opt.step()
    return model


def accuracy(model, x, y):
    model.eval()
    return float((model(x).argmax(axis=1) == y).mean())


@pytest.mark.parametrize("name,optimizer,lr,epochs,options", [
    ("simplenet", "momentum", 0.01, 4, {}),
    ("simple_convnet", "momentum", 0.05, 15, {}),
    ("mlp", "momentum", 0.05, 15, {}),
    ("resnet_small", "momentum", 0.05, 8, {}),
])
def test_model_reaches_97_percent_on_digits(digits, name, optimizer, lr, epochs, options):
    x_train, y_train, x_test, y_test = digits
    model = models.build(name, (1, 8, 8), 10, rng=np.random.default_rng(0), **options)
    fit(model, x_train, y_train, optim.build(optimizer, model, lr=lr), epochs)
    assert accuracy(model, x_test, y_test) >= 0.97


@pytest.mark.slow
@pytest.mark.parametrize("options,lr,epochs", [({"activation": "relu", "pool": "max"}, 1e-3, 8), ({}, 2e-3, 15)],
                         ids=["relu_max", "classic"])
def test_lenet5_reaches_97_percent_on_digits_upsampled_to_28(digits, options, lr, epochs):
    x_train, y_train, x_test, y_test = digits
    model = models.build("lenet5", (1, 28, 28), 10, rng=np.random.default_rng(0), **options)
    fit(model, upsample_to_28(x_train), y_train, optim.build("adam", model, lr=lr), epochs)
    assert accuracy(model, upsample_to_28(x_test), y_test) >= 0.97


def test_softmax_regression_learns_digits(digits):
    x_train, y_train, x_test, y_test = digits
    model = models.build("softmax_regression", (1, 8, 8), 10, rng=np.random.default_rng(0))
    fit(model, x_train, y_train, optim.build("momentum", model, lr=0.05), 15)
    assert accuracy(model, x_test, y_test) >= 0.95


def test_simplenet_flatten_size_is_4096_on_32x32():
    model = models.build("simplenet", (3, 32, 32), 43)
    assert model["fc1"].params["weight"].shape == (3072, 4096)
    assert model["fc2"].params["weight"].shape == (43, 3072)


def test_flatten_sizes_follow_the_input_shape():
    assert models.build("simplenet", (1, 8, 8), 10)["fc1"].params["weight"].shape == (3072, 64 * 2 * 2)
    assert models.build("lenet5", (1, 32, 32), 10)["fc1"].params["weight"].shape == (120, 400)
    assert models.build("lenet5", (1, 28, 28), 10)["conv1"].padding == 2


def test_lenet5_on_8x8_fails_at_build_time_with_clear_message():
    with pytest.raises(models.ModelError, match=r"lenet5.*\(1, 8, 8\).*too small"):
        models.build("lenet5", (1, 8, 8), 10)


def test_unknown_model_and_option_are_refused():
    with pytest.raises(models.ModelError, match="choose one of"):
        models.build("vgg", (1, 8, 8), 10)
    with pytest.raises(models.ModelError, match="mlp"):
        models.build("mlp", (1, 8, 8), 10, depth=3)


def test_same_rng_seed_gives_identical_weights():
    a = models.build("simple_convnet", (1, 28, 28), 10, rng=np.random.default_rng(3)).state_dict()
    b = models.build("simple_convnet", (1, 28, 28), 10, rng=np.random.default_rng(3)).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["softmax", "svm_l1", "svm_l2"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_training_step_never_leaves_float32(loss, optimizer):
    rng = np.random.default_rng(0)
    model = models.build("resnet_small", (3, 8, 8), 5, rng=rng)
    opt = optim.build(optimizer, model, lr=1e-3, reg=1e-4)
    scores = model(rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    _, dscores = losses.build(loss)(scores, np.array([0, 1, 2, 3]))
    assert scores.dtype == dscores.dtype == np.float32
    assert model.backward(dscores).dtype == np.float32
    opt.step()
    for name, p in list(model.named_params()) + list(model.named_buffers()):
        assert p.dtype == np.float32, name
    assert all(g.dtype == np.float32 for _, g in model.named_grads())


@pytest.mark.parametrize("name, options", [
    ("lenet5", {}), ("lenet5", {"activation": "relu", "pool": "max"}), ("simple_convnet", {}),
])
def test_batch_last_convolution_models_stay_float32(name, options):
    """The batch-last convolutions (LeNet-5's, SimpleConvNet's) and the layers after them."""
    rng = np.random.default_rng(0)
    model = models.build(name, (1, 28, 28), 10, rng=rng, **options)
    assert "batch_last" in {m.method for _, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    scores = model(rng.standard_normal((4, 1, 28, 28)).astype(np.float32))
    _, dscores = losses.build("softmax")(scores, np.array([0, 1, 2, 3]))
    assert scores.dtype == np.float32 and model.backward(dscores).dtype == np.float32
    assert all(g.dtype == np.float32 for _, g in model.named_grads())


def second_step_peak(model, loss_fn, opt, x, y):
    """Peak bytes newly allocated by a second training step: the first makes the buffers later ones reuse."""
    import tracemalloc

    def step():
        _, dscores = loss_fn(model(x), y)
        model.backward(dscores)
        opt.step()

    step()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        step()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("blas_threads", [1, 2])
def test_a_simplenet_training_step_allocates_no_parameter_sized_temporary(blas_threads, monkeypatch):
    """Regression guard for the hot path, counted in bytes rather than timed.

    What one SimpleNet step (batch 64, plain SGD with reg, FC1's update fused into backward as the
    trainer runs it, BN-ReLU-pool pooled first) keeps for its backward pass is about 45 MB; its peak
    of new allocations is about 69 MB. A float64 upcast of the activations, or a temporary the size
    of FC1's 12.6M weights (48 MB, e.g. ``w -= lr * (g + reg * w)`` done whole: 93 MB), pushes it
    past the 85 MB bound. On one BLAS thread (a run's default) conv2 runs as Winograd, which keeps its
    transformed input (8.4 MB) instead of unfolds, and FC1's input gradient is summed into one 1 MB array
    over blocks of its weights: about 49 MB (60 on two).
    """
    monkeypatch.setattr(blas, "threads", lambda: blas_threads)
    rng = np.random.default_rng(0)
    model = models.build("simplenet", (3, 32, 32), 43, rng=rng)
    model.set_input_grad(False)
    opt = optim.build("sgd", model, lr=1e-3, reg=1e-4)
    assert opt.fuse_into_backward() == 1
    x, y = rng.standard_normal((64, 3, 32, 32), dtype=np.float32), rng.integers(0, 43, 64)
    peak = second_step_peak(model, losses.build("svm_l2"), opt, x, y)
    assert 30 * 2**20 < peak < 85 * 2**20, f"peak {peak / 2**20:.1f} MB"


def test_a_resnet_small_training_step_on_one_blas_thread_keeps_no_unfold(monkeypatch):
    """Memory guard for the chunked unfolds (nn.NARROW_TAPS): one resnet_small step (batch 64, 1x28x28)
    on one BLAS thread peaks at about 52 MB of new allocations; keeping the unfolds of its 3x3
    convolutions, as on two BLAS threads, 120 MB (each 16-channel one is 29 MB). Bound: 80 MB."""
    monkeypatch.setattr(blas, "threads", lambda: 1)
    rng = np.random.default_rng(0)
    model = models.build("resnet_small", (1, 28, 28), 10, rng=rng)
    model.set_input_grad(False)
    x, y = rng.standard_normal((64, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 64)
    peak = second_step_peak(model, losses.build("softmax"), optim.build("sgd", model, lr=1e-3), x, y)
    assert 20 * 2**20 < peak < 80 * 2**20, f"peak {peak / 2**20:.1f} MB"


def test_a_forward_pass_first_releases_what_the_last_one_kept_for_backward():
    """Memory guard: what a training step kept for its backward pass (SimpleNet: about 45 MB of
    unfolded patches and activations) is dropped when the next forward pass starts, not layer by
    layer as each replaces its own, so an evaluation pass after training never holds both. With the
    step's gradients, 94 MB is held; the evaluation pass then peaked at 95 MB, and at 114 MB without
    the release."""
    import tracemalloc

    rng = np.random.default_rng(0)
    model = models.build("simplenet", (3, 32, 32), 43, rng=rng)
    model.set_input_grad(False)
    loss_fn, opt = losses.build("softmax"), optim.build("sgd", model, lr=1e-3)
    x, y = rng.standard_normal((64, 3, 32, 32), dtype=np.float32), rng.integers(0, 43, 64)
    tracemalloc.start()
    try:
        _, dscores = loss_fn(model(x), y)
        model.backward(dscores)
        opt.step()
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        model.eval()
        model(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert held > 30 * 2**20, f"held {held / 2**20:.1f} MB"
    assert peak < 1.15 * held, f"eval peak {peak / 2**20:.1f} MB with {held / 2**20:.1f} MB held"


def test_release_caches_reaches_blocks_and_pool_first_groups():
    rng = np.random.default_rng(0)
    model = models.build("resnet_small", (3, 8, 8), 5, rng=rng)
    model(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert any(m._cache is not None for _, m in model.named_modules())
    model.release_caches()
    assert all(m._cache is None and not hasattr(m, "_ran") for _, m in model.named_modules())


def test_sigmoid_is_torchs_formula_in_the_input_layout_without_warnings():
    """``1 / (1 + exp(-x))``: within float rounding of the float64 value wherever the float32 one is a
    normal number, and within the smallest normal number below that (exactly 0 below x = -88.7, where
    exp overflows); exact at signed zeros and infinities; no overflow warning, in the input's memory layout."""
    rng = np.random.default_rng(0)
    body = (4 * rng.standard_normal((5, 6, 7, 3))).astype(np.float32)
    special = [-np.inf, -1000, -104, -88, -1e-3, -0.0, 0, 1e-3, 88, 1000, np.inf]
    body.reshape(-1)[:11] = special
    x = body.transpose(3, 0, 1, 2)  # batch-last memory, as after a batch-last convolution
    with np.errstate(over="raise", divide="raise", invalid="raise", under="ignore"):
        out = nn.Sigmoid().forward(x)
    with np.errstate(over="ignore"):
        exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert out.dtype == np.float32 and out.strides == x.strides
    normal = exact >= np.finfo(np.float32).tiny
    np.testing.assert_allclose(out[normal], exact[normal], rtol=3e-7, atol=0)
    np.testing.assert_allclose(out[~normal], exact[~normal], rtol=0, atol=np.finfo(np.float32).tiny)
    flat = nn.Sigmoid().forward(np.array(special, dtype=np.float32))
    assert flat.tolist()[:2] == [0.0, 0.0] and flat[5] == flat[6] == 0.5 and flat[-1] == 1.0 and flat[-2] == 1.0
    assert flat[2] == 0.0 and 0 < flat[3] < 1e-38  # exp(104) overflows; exp(88) does not
