"""numexp against PyTorch in float64: layers, losses, whole models and optimizer trajectories.

Each test copies numexp's parameters (and BatchNorm buffers) into the equivalent torch module
through ``state_dict`` (which also checks that the dotted names and shapes are torch's), feeds
both the same input and the same random upstream gradient, and compares the output, the input
gradient and every parameter gradient with ``rel_error < 1e-6``. Optimizers are compared on
multi-step trajectories of a real loss. Skipped when torch is not installed.
"""
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch parity tests need the test extra: pip install -e '.[test]'")
F = torch.nn.functional
tnn = torch.nn

from numexp import blas, kernels, losses, models, nn, optim, torchref, winograd  # noqa: E402
from numexp.gradcheck import rel_error  # noqa: E402

TOL = 1e-6


@pytest.fixture(autouse=True)
def float64():
    """Every test here runs in float64 on both sides; the previous defaults are restored."""
    old_np, old_torch = nn.get_default_dtype(), torch.get_default_dtype()
    nn.set_default_dtype(np.float64)
    torch.set_default_dtype(torch.float64)
    yield
    nn.set_default_dtype(old_np)
    torch.set_default_dtype(old_torch)


# --------------------------------------------------------------------------- helpers

class TorchResidual(tnn.Module):
    """Reference ResNet basic block written from the spec, not from numexp's code:
    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, shortcut a 1x1 conv + BN when projecting."""

    def __init__(self, cin, cout, stride=1, projection=False, eps=1e-5, momentum=0.1):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout, eps=eps, momentum=momentum)
        self.relu1 = tnn.ReLU()
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout, eps=eps, momentum=momentum)
        self.downsample = None
        if projection:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, 0, bias=False),
                                             tnn.BatchNorm2d(cout, eps=eps, momentum=momentum))

    def forward(self, x):
        h = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        short = x if self.downsample is None else self.downsample(x)
        return torch.relu(h + short)


def copy_to_torch(ne, t):
    """Load numexp's state dict into torch module ``t``; the keys and shapes must be torch's."""
    state = {k: torch.from_numpy(v.copy()) for k, v in ne.state_dict().items()}
    missing, unexpected = t.load_state_dict(state, strict=False)
    assert not unexpected, f"numexp keys torch does not have: {unexpected}"
    assert all(k.endswith("num_batches_tracked") for k in missing), f"keys numexp lacks: {missing}"
    t.train(ne.training)
    return t


def as_torch(ne):
    """A torch twin of numexp module ``ne`` holding the same parameters and buffers."""
    return torchref.to_torch(ne)


def randomize_batchnorm(ne, rng):
    """Give every BatchNorm non-trivial weight, bias and running statistics (they start at 1/0)."""
    for _, m in ne.named_modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.params["weight"][...] = 1 + 0.3 * rng.standard_normal(n)
            m.params["bias"][...] = 0.3 * rng.standard_normal(n)
            m.buffers["running_mean"][...] = 0.5 * rng.standard_normal(n)
            m.buffers["running_var"][...] = rng.uniform(0.5, 2.0, n)


def assert_close(actual, expected, what):
    err = rel_error(actual, expected)
    assert np.shape(actual) == np.shape(expected), f"{what}: shape {np.shape(actual)} != {np.shape(expected)}"
    assert err < TOL, f"{what}: relative error {err:.3e} >= {TOL}"


def assert_param_grads_close(ne, t):
    ne_grads = dict(ne.named_grads())
    t_grads = {k: p.grad for k, p in t.named_parameters()}
    assert set(ne_grads) == set(t_grads), f"parameter names differ: {sorted(ne_grads)} vs {sorted(t_grads)}"
    for name, g in t_grads.items():
        assert ne_grads[name] is not None, f"numexp left no gradient for {name}"
        assert_close(ne_grads[name], g.numpy(), f"grad of {name}")


def assert_state_close(ne, t, what=""):
    t_state = t.state_dict()
    for name, value in ne.state_dict().items():
        assert_close(value, t_state[name].numpy(), f"{name} {what}".strip())


def check_forward_backward(ne, t, x, rng, what="layer"):
    """Same x and random upstream gradient into both; compare out, dx and every parameter gradient."""
    out = ne(x)
    out_copy = np.array(out, copy=True)
    t.zero_grad(set_to_none=True)  # torch accumulates .grad; numexp overwrites
    xt = torch.tensor(x, requires_grad=True)
    out_t = t(xt)
    assert_close(out_copy, out_t.detach().numpy(), f"{what} output")
    dout = rng.standard_normal(out.shape)
    dout_copy = dout.copy()
    dx = ne.backward(dout)
    np.testing.assert_array_equal(dout, dout_copy, err_msg=f"{what}.backward modified dout")
    out_t.backward(torch.from_numpy(dout_copy))
    assert_close(dx, xt.grad.numpy(), f"{what} input gradient")
    assert_param_grads_close(ne, t)
    return out_copy


def away_from_zero(rng, shape, gap=0.1):
    """Normal-ish values with |x| >= gap, so ReLU's kink at 0 is never straddled."""
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0) * (gap + np.abs(rng.standard_normal(shape)))


def distinct_values(rng, shape):
    """A random permutation of distinct values: no max-pool ties anywhere."""
    size = int(np.prod(shape))
    return (rng.permutation(size).reshape(shape) - size / 2) / size * 4.0


# --------------------------------------------------------------------------- layers

@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(bias):
    rng = np.random.default_rng(0)
    layer = nn.Linear(7, 4, bias=bias, rng=rng)
    check_forward_backward(layer, as_torch(layer), rng.standard_normal((5, 7)), rng, "Linear")


CONV_CASES = [  # (input shape, out_channels, kernel, stride, padding, bias)
    ((2, 3, 7, 7), 4, 3, 1, 1, True),
    ((1, 2, 9, 6), 3, 3, 2, 0, True),    # batch of 1, non-square, stride 2
    ((3, 1, 8, 8), 5, 5, 1, 2, True),    # kernel 5, padding 2
    ((2, 4, 5, 7), 2, 1, 1, 0, False),   # kernel 1, no bias
    ((2, 3, 11, 10), 4, 5, 2, 1, True),  # odd sizes, stride 2, padding 1
    ((1, 2, 6, 9), 3, 3, 2, 2, False),   # padding 2 with stride 2, no bias
    ((3, 2, 6, 8), 4, 3, 1, 1, True),    # even sizes: Winograd applies
    ((2, 3, 6, 5), 2, 1, 2, 1, True),    # kernel 1 with stride 2 and padding 1
]


@pytest.mark.parametrize("method", list(nn.Conv2d.METHODS))
@pytest.mark.parametrize("shape,f,k,stride,padding,bias", CONV_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-f{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}-{'bias' if c[5] else 'nobias'}"
                              for c in CONV_CASES])
def test_conv2d_matches_torch(shape, f, k, stride, padding, bias, method, monkeypatch):
    monkeypatch.setattr(blas, "threads", lambda: 1)  # Winograd runs on one BLAS thread only
    rng = np.random.default_rng(1)
    layer = nn.Conv2d(shape[1], f, k, stride, padding, bias=bias, method=method, rng=rng)
    t = as_torch(layer)
    out = check_forward_backward(layer, t, rng.standard_normal(shape), rng, f"Conv2d[{method}]")
    assert out.shape[1:] == layer.output_shape(shape[1:])
    if method == "winograd":  # where it applies, not the im2col it falls back to
        assert isinstance(layer._cache[1], str) == (k == 3 and stride == 1 and padding == 1 and shape[2] % 2 == 0
                                                    and shape[3] % 2 == 0)


@pytest.mark.parametrize("k,stride", [(2, 2), (3, 2), (3, 1), (2, 1)])
def test_maxpool2d_matches_torch_including_overlapping_windows(k, stride):
    rng = np.random.default_rng(2)
    layer = nn.MaxPool2d(k, stride)
    check_forward_backward(layer, as_torch(layer), distinct_values(rng, (2, 3, 7, 9)), rng, "MaxPool2d")


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9)], ids=["tiled", "floor-mode"])
@pytest.mark.parametrize("k,stride", [(2, 2), (3, 2), (2, 1)])
def test_maxpool2d_ties_send_the_gradient_to_the_first_maximum_as_torch(shape, k, stride):
    """Few distinct values (ReLU zeros, repeats), so most windows hold their maximum more than once."""
    rng = np.random.default_rng(5)
    layer = nn.MaxPool2d(k, stride)
    x = np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float64)
    check_forward_backward(layer, as_torch(layer), x, rng, "MaxPool2d with ties")


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (4, 3, 7, 9)], ids=["tiled", "floor-mode"])
@pytest.mark.parametrize("gamma", ["positive", "one-negative"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_relu_maxpool_pooled_first_matches_torch(shape, gamma, mode):
    """Sequential runs BatchNorm2d -> ReLU -> MaxPool2d(2) as one pool-first step (nn.PoolFirst) when
    every BN scale is positive, else layer by layer; both agree with torch, running statistics too."""
    rng = np.random.default_rng(6)
    seq = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2))
    randomize_batchnorm(seq, rng)
    seq["0"].params["weight"][:] = [0.7, 1.3, -0.4 if gamma == "one-negative" else 0.2]
    t = as_torch(seq)
    if mode == "eval":
        seq.eval(), t.eval()
    # repeats inside windows, so the first-maximum rule is exercised too
    x = np.round(rng.standard_normal(shape), 1)
    check_forward_backward(seq, t, x, rng, f"BN-ReLU-MaxPool ({gamma}, {mode})")
    assert_state_close(seq, t, "running statistics")
    # a negative scale: BatchNorm2d alone, then ReLU -> MaxPool2d still pooled first
    steps = [type(step).__name__ for step in seq._ran]
    assert steps == (["PoolFirst"] if gamma == "positive" else ["BatchNorm2d", "PoolFirst"])
    assert seq._ran[-1].bn is (seq["0"] if gamma == "positive" else None)


@pytest.mark.parametrize("shape", [(4, 2, 8, 8), (4, 8, 8, 8), (4, 2, 7, 9)], ids=["tiled", "tiled-wide", "floor-mode"])
@pytest.mark.parametrize("gamma", ["positive", "one-negative", "no-bn"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("method", ["im2col", "taps", "batch_last", "winograd"])
def test_conv_into_pooled_first_group_matches_torch(shape, gamma, mode, method, monkeypatch):
    """Conv2d -> [BatchNorm2d ->] ReLU -> MaxPool2d(2): where the windows tile the conv's output, the
    conv hands it over in pool blocks (Conv2d.pool_blocks) to the pool-first group, which sends the
    gradient back in that layout; integer weights and inputs make ties everywhere. A declining group
    (negative scale) gets the output back as (N, C, H, W); floor mode never uses blocks. With 8 input
    channels the im2col rows are wide (72 values): on one BLAS thread (as here) the unfold is not kept but
    built again in backward. Winograd runs F(2x2, 3x3) here, whose transforms are exact on integers: F(4x4,
    3x3)'s (fractions of 6 and 24) round, and a tie may then go to another tap than torch's (see
    test_winograd_4x4_tiles_into_pooled_first_group_match_torch)."""
    monkeypatch.setattr(blas, "threads", lambda: 1)
    monkeypatch.setattr(nn, "WINOGRAD_TILE", 2)
    rng = np.random.default_rng(8)
    # a bias before batch-statistics BN has a gradient of 0 up to rounding: none there, as in SimpleNet
    layers = [nn.Conv2d(shape[1], 3, 3, padding=1, bias=gamma == "no-bn", method=method, rng=rng)]
    layers += [nn.BatchNorm2d(3)] if gamma != "no-bn" else []
    seq = nn.Sequential(*layers, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    conv = seq["0"]
    conv.params["weight"][...] = rng.integers(-1, 2, conv.params["weight"].shape)
    if "bias" in conv.params:
        conv.params["bias"][...] = rng.integers(-1, 2, 3)
    if gamma != "no-bn":
        randomize_batchnorm(seq, rng)
        seq["1"].params["weight"][:] = [0.7, 1.3, -0.4 if gamma == "one-negative" else 0.2]
    t = as_torch(seq)
    if mode == "eval":
        seq.eval(), t.eval()
    x = rng.integers(-2, 3, size=shape).astype(np.float64)
    check_forward_backward(seq, t, x, rng, f"Conv-BN-ReLU-MaxPool ({gamma}, {mode})")
    assert_state_close(seq, t, "running statistics")
    tiled = shape[2:] == (8, 8)
    blocked = tiled and gamma != "one-negative"
    assert conv._cache[-1] == (2 if tiled else 1)  # the conv's layout; the group may decline it
    if method == "im2col":
        assert (conv._cache[1] is None) == (shape[1] == 8 or mode == "eval")  # the unfold kept or not
    if method == "winograd":  # its tiles are the pool blocks; odd sizes fall back to im2col
        assert isinstance(conv._cache[1], str) == tiled  # ("winograd", ...) in the cache
    steps = [type(step).__name__ for step in seq._ran]
    if gamma == "one-negative":
        assert steps == ["Conv2d", "BatchNorm2d", "PoolFirst", "Flatten"]
    else:
        assert steps == ["Conv2d", "PoolFirst", "Flatten"]
    group = next(step for step in seq._ran if isinstance(step, nn.PoolFirst))
    assert (group._cache[3] is not None) == blocked


@pytest.mark.parametrize("shape", [(4, 8, 8, 8), (2, 32, 8, 12)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_winograd_4x4_tiles_into_pooled_first_group_match_torch(shape, mode, monkeypatch):
    """F(4x4, 3x3) where the image cuts into 4x4 tiles: each tile holds four 2x2 pool windows, written into
    and read back from the pool blocks, with float inputs (no ties)."""
    monkeypatch.setattr(blas, "threads", lambda: 1)
    rng = np.random.default_rng(18)
    seq = nn.Sequential(nn.Conv2d(shape[1], 5, 3, padding=1, bias=False, method="winograd", rng=rng),
                        nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    randomize_batchnorm(seq, rng)
    seq["1"].params["weight"][:] = np.abs(seq["1"].params["weight"]) + 0.1
    t = as_torch(seq)
    if mode == "eval":
        seq.eval(), t.eval()
    check_forward_backward(seq, t, rng.standard_normal(shape), rng, f"Winograd 4x4-Conv-BN-ReLU-MaxPool ({mode})")
    assert_state_close(seq, t, "running statistics")
    conv = seq["0"]
    assert conv._cache[1] == "winograd" and conv._cache[4] is winograd.F4 and conv._cache[-1] == 2
    assert [type(step).__name__ for step in seq._ran] == ["Conv2d", "PoolFirst", "Flatten"]


@pytest.mark.parametrize("channels_last", [True, False], ids=["im2col-rows", "taps-columns"])
def test_pooled_unfolds_give_pool_blocks_and_unpool_blocks_inverts_them(channels_last):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 2, 6, 8))
    w_rows = rng.standard_normal((5, 18))  # (F, 9*C), columns (i, j, c)
    plain = kernels.channels_first((kernels.im2col(x, 3, 3, 1, 1) @ w_rows.T).reshape(3, 6, 8, 5))
    if channels_last:
        blocked = (kernels.im2col(x, 3, 3, 1, 1, pool=2) @ w_rows.T).reshape(4, 3, 3, 4, 5).transpose(0, 1, 4, 2, 3)
    else:
        w_taps = w_rows.reshape(5, 3, 3, 2).transpose(0, 3, 1, 2).reshape(5, 18)  # columns (c, i, j)
        cols = np.matmul(w_taps, kernels.im2col_taps(x, 3, 3, 1, 1, pool=2))  # (N, F, tap*ph*pw)
        blocked = cols.reshape(3, 5, 4, 3, 4).transpose(2, 0, 1, 3, 4)
    np.testing.assert_allclose(blocked, kernels.pool_blocks(plain, 2, channels_last), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(kernels.unpool_blocks(kernels.pool_blocks(plain, 2, channels_last), 2), plain)
    assert kernels.unpool_blocks(blocked, 2, channels_last=True).transpose(0, 2, 3, 1).flags.c_contiguous


def test_col2im_taps_with_pool_is_the_adjoint_of_im2col_taps_with_pool():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 7, 9))
    col = kernels.im2col_taps(x, 3, 3, 1, 0, pool=1)  # 5x7 output: not pooled, the plain case first
    c = rng.standard_normal(col.shape)
    assert np.isclose(np.vdot(col, c), np.vdot(x, kernels.col2im_taps(c, x.shape, 3, 3, 1, 0)))
    x = rng.standard_normal((2, 3, 8, 6))
    col = kernels.im2col_taps(x, 3, 3, 1, 1, pool=2)
    c = rng.standard_normal(col.shape)
    assert np.isclose(np.vdot(col, c), np.vdot(x, kernels.col2im_taps(c, x.shape, 3, 3, 1, 1, pool=2)))


@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centred", "far-from-zero"])
def test_pooled_first_batchnorm_variance_stays_accurate_in_float32(offset):
    """PoolFirst takes the variance as E[x²] - mean² (no centred copy) only while mean² <= var; a
    channel far from zero (mean²/var = 9e4) would lose every digit that way, so it uses the centred
    rows. Both agree with float64 to float32 accuracy."""
    rng = np.random.default_rng(11)
    x64 = offset + rng.standard_normal((8, 3, 6, 6))
    bn = nn.BatchNorm2d(3)
    rows = bn._rows(x64.astype(np.float32))
    mean, var, m = bn.batch_mean_var(rows)
    assert m == 8 * 36 and mean.dtype == var.dtype == np.float32
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=2e-5)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-6)
    _, _, two_pass, _ = bn.batch_moments(rows)
    np.testing.assert_allclose(var, two_pass, rtol=2e-5)


@pytest.mark.parametrize("layout", ["channels-last", "strided"])
def test_centred_variance_in_chunks_of_rows_matches_float64(layout):
    """The centred fallback runs over cache-sized chunks of (wide) rows: many chunks, a short last one
    and rows that are not contiguous all give the float64 variance."""
    rng = np.random.default_rng(12)
    x64 = 50.0 + rng.standard_normal((10, 4, 7, 6))  # every channel's mean² far above its variance
    bn = nn.BatchNorm2d(4)
    x32 = x64.astype(np.float32)
    rows = bn._rows(np.ascontiguousarray(x32.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))
    if layout == "strided":
        rows = np.asfortranarray(rows)
    assert rows.flags.c_contiguous == (layout == "channels-last")
    mean, m = bn._batch_mean(rows)
    chunk_bytes = 3 * 4 * rows.shape[1] * (5 if layout == "channels-last" else 1)  # 15 or 3 rows a chunk
    var = bn._centred_mean_square(rows, mean, m, chunk_bytes=chunk_bytes)
    assert var.dtype == np.float32 and var.shape == (4,)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=2e-5)
    np.testing.assert_allclose(bn.batch_mean_var(rows)[1], var, rtol=1e-5)


@pytest.mark.parametrize("running", ["near-the-mean", "far-from-the-mean"])
def test_variance_about_the_running_mean_matches_float64(running, monkeypatch):
    """Where running_mean² > running_var, batch_mean_var sums X less the running mean in one pass; with the
    running mean near the batch's that is the variance, with it far away (here the mean's negative) the
    centred rows give it. Both agree with float64."""
    rng = np.random.default_rng(13)
    x64 = 40.0 + rng.standard_normal((9, 3, 5, 7))
    bn = nn.BatchNorm2d(3)
    mean64 = x64.mean(axis=(0, 2, 3))
    bn.buffers["running_mean"][:] = mean64 + 0.5 if running == "near-the-mean" else -mean64
    running_mean = bn.buffers["running_mean"].copy()
    centred = []
    real = bn._centred_mean_square
    monkeypatch.setattr(bn, "_centred_mean_square", lambda *a, **k: centred.append(1) or real(*a, **k))
    rows = bn._rows(np.ascontiguousarray(x64.astype(np.float32).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))
    mean, var, m = bn.batch_mean_var(rows)
    assert m == 9 * 35 and mean.dtype == var.dtype == np.float32
    assert len(centred) == (running == "far-from-the-mean")
    np.testing.assert_allclose(mean, mean64, rtol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=2e-5)
    np.testing.assert_array_equal(bn.buffers["running_mean"], running_mean)  # the statistics only read them


def test_relu_maxpool_pooled_first_with_ties_matches_torch():
    rng = np.random.default_rng(7)
    seq = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    x = rng.integers(-2, 3, size=(2, 3, 7, 8)).astype(np.float64)  # ReLU zeros and repeats everywhere
    check_forward_backward(seq, as_torch(seq), x, rng, "ReLU-MaxPool")
    assert isinstance(seq._ran[0], nn.PoolFirst)


@pytest.mark.parametrize("k,stride", [(2, 2), (3, 2), (3, 1), (2, None)])
def test_avgpool2d_matches_torch(k, stride):
    rng = np.random.default_rng(3)
    layer = nn.AvgPool2d(k, stride)
    check_forward_backward(layer, as_torch(layer), rng.standard_normal((2, 3, 7, 9)), rng, "AvgPool2d")


def test_global_avg_pool_matches_torch_adaptive_avg_pool_1():
    rng = np.random.default_rng(4)
    check_forward_backward(nn.GlobalAvgPool2d(), tnn.AdaptiveAvgPool2d(1),
                           rng.standard_normal((3, 4, 5, 7)), rng, "GlobalAvgPool2d")


ACTIVATIONS = {
    "relu": (nn.ReLU, tnn.ReLU, lambda rng: away_from_zero(rng, (4, 3, 5, 6))),
    "sigmoid": (nn.Sigmoid, tnn.Sigmoid, lambda rng: np.concatenate(
        [4 * rng.standard_normal((4, 6)), [[-40.0, -20.0, -1e-3, 1e-3, 20.0, 40.0]]])),
    "tanh": (nn.Tanh, tnn.Tanh, lambda rng: 2 * rng.standard_normal((4, 3, 5))),
    "softmax_dim1": (nn.Softmax, lambda: tnn.Softmax(dim=1), lambda rng: np.concatenate(
        [3 * rng.standard_normal((4, 6)), 1000 + rng.standard_normal((1, 6))])),
    "flatten": (nn.Flatten, tnn.Flatten, lambda rng: rng.standard_normal((2, 3, 4, 5))),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_parameter_free_layer_matches_torch(name):
    make_ne, make_t, make_x = ACTIVATIONS[name]
    rng = np.random.default_rng(5)
    check_forward_backward(make_ne(), make_t(), make_x(rng), rng, name)


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (8, 5)), (nn.BatchNorm1d, (6, 5, 3)),
                                       (nn.BatchNorm2d, (4, 3, 5, 6))],
                         ids=["bn1d-NC", "bn1d-NCL", "bn2d"])
def test_batchnorm_train_mode_matches_torch_over_three_passes(cls, shape):
    rng = np.random.default_rng(6)
    layer = cls(shape[1])
    randomize_batchnorm(layer, rng)
    t = as_torch(layer)
    for step in range(3):
        x = 1.5 + 2.0 * rng.standard_normal(shape)  # off-centre, not unit scale
        check_forward_backward(layer, t, x, rng, f"{cls.__name__} pass {step + 1}")
    # running_mean / running_var (unbiased batch variance, momentum 0.1) after 3 updates
    assert_state_close(layer, t, "after 3 training passes")


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (8, 5)), (nn.BatchNorm2d, (4, 3, 5, 6))],
                         ids=["bn1d", "bn2d"])
def test_batchnorm_eval_mode_uses_running_stats_like_torch(cls, shape):
    rng = np.random.default_rng(7)
    layer = cls(shape[1])
    randomize_batchnorm(layer, rng)
    layer.eval()
    t = as_torch(layer)
    assert not t.training
    check_forward_backward(layer, t, 1.0 + rng.standard_normal(shape), rng, f"{cls.__name__} eval")
    assert_state_close(layer, t, "after an eval pass (unchanged)")


@pytest.mark.parametrize("cin,cout,stride,shape", [(4, 4, 1, (2, 4, 6, 6)),    # identity shortcut
                                                   (4, 8, 2, (2, 4, 7, 7)),    # projection, stride 2, odd size
                                                   (4, 6, 1, (1, 4, 5, 6))],   # projection for channels only
                         ids=["identity", "proj-stride2", "proj-channels"])
def test_residual_block_matches_torch_basic_block(cin, cout, stride, shape):
    rng = np.random.default_rng(8)
    block = nn.Residual(cin, cout, stride, rng=rng)
    randomize_batchnorm(block, rng)
    assert (block.downsample is not None) == (cin != cout or stride != 1)
    t = copy_to_torch(block, TorchResidual(cin, cout, stride, projection=block.downsample is not None))
    check_forward_backward(block, t, rng.standard_normal(shape), rng, "Residual")
    assert_state_close(block, t, "after a training pass")
    block.eval()
    t.eval()
    check_forward_backward(block, t, rng.standard_normal(shape), rng, "Residual eval")
    # in eval the BatchNorms ran folded into the convolutions (nn.ConvBN)
    assert [type(step).__name__ for step in block._ran] == ["ConvBN", "ConvBN"]
    if block.downsample is not None:
        assert [type(step).__name__ for step in block.downsample._ran] == ["ConvBN"]


def test_dropout_p0_is_identity_like_torch():
    rng = np.random.default_rng(9)
    check_forward_backward(nn.Dropout(0.0), tnn.Dropout(0.0), rng.standard_normal((4, 10)), rng, "Dropout(0)")


def test_dropout_in_eval_mode_is_identity_like_torch():
    rng = np.random.default_rng(10)
    layer = nn.Dropout(0.5).eval()
    t = tnn.Dropout(0.5).eval()
    check_forward_backward(layer, t, rng.standard_normal((4, 10)), rng, "Dropout eval")


def test_dropout_backward_uses_the_forward_mask():
    rng = np.random.default_rng(11)
    p = 0.3
    layer = nn.Dropout(p, rng=np.random.default_rng(0))
    x = away_from_zero(rng, (50, 200))
    out = np.array(layer(x), copy=True)
    kept = out != 0
    # kept elements are scaled by 1/(1-p), as torch's inverted dropout; about p of them are dropped
    np.testing.assert_allclose(out[kept], x[kept] / (1 - p), rtol=1e-12, atol=0)
    assert abs((~kept).mean() - p) < 0.02
    dout = rng.standard_normal(x.shape)
    dx = layer.backward(dout)
    np.testing.assert_allclose(dx, np.where(kept, dout / (1 - p), 0.0), rtol=1e-12, atol=0)
    # a second forward draws a new mask, and backward follows that one
    out2 = np.array(layer(x), copy=True)
    assert (out2 != 0).tolist() != kept.tolist()
    np.testing.assert_allclose(layer.backward(dout), np.where(out2 != 0, dout / (1 - p), 0.0), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- losses

def _torch_loss(name, scores_t, y_t):
    if name == "cross_entropy":
        return F.cross_entropy(scores_t, y_t)
    return F.multi_margin_loss(scores_t, y_t, p={"hinge": 1, "squared_hinge": 2}[name])


LOSS_CLASSES = {"cross_entropy": losses.CrossEntropy, "hinge": losses.Hinge, "squared_hinge": losses.SquaredHinge}


@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["unit", "large"])
@pytest.mark.parametrize("name", list(LOSS_CLASSES))
def test_loss_value_and_dscores_match_torch(name, scale):
    rng = np.random.default_rng(12)
    scores = scale * rng.standard_normal((7, 5)) + (1000.0 if scale > 1 else 0.0)
    y = rng.integers(0, 5, 7)
    loss, dscores = LOSS_CLASSES[name]()(scores.copy(), y)
    scores_t = torch.tensor(scores, requires_grad=True)
    loss_t = _torch_loss(name, scores_t, torch.from_numpy(y))
    loss_t.backward()
    assert_close(loss, loss_t.item(), f"{name} loss")
    assert_close(dscores, scores_t.grad.numpy(), f"{name} dscores")


def test_parity_checks_are_sensitive_to_a_wrong_configuration():
    """The comparisons can fail: Hinge is not MultiMarginLoss(p=2), and a 1e-4 weight change is caught."""
    rng = np.random.default_rng(13)
    scores, y = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    loss, dscores = losses.Hinge()(scores, y)
    scores_t = torch.tensor(scores, requires_grad=True)
    wrong = F.multi_margin_loss(scores_t, torch.from_numpy(y), p=2)
    wrong.backward()
    assert rel_error(loss, wrong.item()) > 1e-3
    assert rel_error(dscores, scores_t.grad.numpy()) > 1e-3

    layer = nn.Linear(5, 3, rng=rng)
    t = as_torch(layer)
    with torch.no_grad():
        t.weight[0, 0] += 1e-4
    x = rng.standard_normal((4, 5))
    with pytest.raises(AssertionError, match="output"):
        check_forward_backward(layer, t, x, rng)


# --------------------------------------------------------------------------- whole models

MODEL_CASES = [  # (name, in_shape, num_classes, options)
    ("simplenet", (3, 32, 32), 43, {}),
    ("simple_convnet", (1, 28, 28), 10, {}),
    ("lenet5", (1, 28, 28), 10, {}),
    ("lenet5", (1, 32, 32), 10, {}),
    ("lenet5", (1, 28, 28), 10, {"activation": "relu", "pool": "max"}),
    ("lenet5", (1, 32, 32), 10, {"activation": "relu", "pool": "max"}),
    ("mlp", (1, 28, 28), 10, {"hidden": (64, 32)}),
    ("mlp", (1, 8, 8), 10, {"hidden": (40,), "activation": "tanh"}),
    ("softmax_regression", (1, 28, 28), 10, {}),
    ("resnet_small", (3, 16, 16), 10, {}),
]


def _model_id(case):
    name, shape, k, options = case
    return "-".join([name, "x".join(map(str, shape)), f"k{k}"] + [str(v) for v in options.values()])


def test_every_registered_model_has_a_parity_case():
    assert set(models.MODELS) == {c[0] for c in MODEL_CASES}


@pytest.mark.parametrize("name,in_shape,num_classes,options", MODEL_CASES, ids=[_model_id(c) for c in MODEL_CASES])
def test_model_scores_and_gradients_match_torch_in_train_mode(name, in_shape, num_classes, options):
    rng = np.random.default_rng(14)
    model = models.build(name, in_shape, num_classes, rng=np.random.default_rng(0), **options)
    randomize_batchnorm(model, rng)
    model.train()
    t = as_torch(model)
    x = rng.standard_normal((4, *in_shape))
    y = rng.integers(0, num_classes, 4)

    scores = np.array(model(x), copy=True)
    loss, dscores = losses.CrossEntropy()(scores, y)
    dx = model.backward(dscores)

    xt = torch.tensor(x, requires_grad=True)
    scores_t = t(xt)
    loss_t = F.cross_entropy(scores_t, torch.from_numpy(y))
    loss_t.backward()

    assert scores.shape == (4, num_classes)
    assert_close(scores, scores_t.detach().numpy(), f"{name} scores")
    assert_close(loss, loss_t.item(), f"{name} loss")
    assert_close(dx, xt.grad.numpy(), f"{name} input gradient")
    assert_param_grads_close(model, t)
    assert_state_close(model, t, "after a training pass")  # BatchNorm running statistics

    model.eval()
    t.eval()
    with torch.no_grad():
        assert_close(model(x), t(torch.from_numpy(x)).numpy(), f"{name} eval scores")


# --------------------------------------------------------------------------- optimizers

def _opt_model(rng):
    """Small model with every parameter kind: Conv2d (weight, bias), BatchNorm2d/1d, Linear.

    The activations come before BatchNorm so no bias feeds straight into a BatchNorm (its gradient would be 0).
    """
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.BatchNorm2d(3), nn.Flatten(),
                         nn.Linear(48, 8, rng=rng), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 3, rng=rng))


def _run_trajectories(ne_model, t_model, ne_opt, t_opt, steps=6):
    """``steps`` steps of cross-entropy on fresh batches; parameters compared after every step."""
    rng = np.random.default_rng(15)
    start = ne_model.state_dict()
    loss_fn = losses.CrossEntropy()
    for step in range(1, steps + 1):
        x, y = rng.standard_normal((6, 2, 4, 4)), rng.integers(0, 3, 6)
        _, dscores = loss_fn(ne_model(x), y)
        ne_model.backward(dscores)
        ne_opt.step()
        t_opt.zero_grad()
        F.cross_entropy(t_model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        t_opt.step()
        assert_state_close(ne_model, t_model, f"after step {step}")
    moved = [k for k, v in ne_model.named_params() if not np.allclose(v, start[k], rtol=0, atol=1e-8)]
    assert len(moved) == len(dict(ne_model.named_params())), "some parameters never moved"


OPT_CASES = {  # id: (numexp class, numexp options, torch class, torch options)
    "sgd": (optim.SGD, dict(lr=0.1), torch.optim.SGD, dict(lr=0.1)),
    "sgd-momentum": (optim.SGD, dict(lr=0.1, momentum=0.9), torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd-nesterov": (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True),
                     torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "sgd-dampening": (optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.3),
                      torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.3)),
    "sgd-weight-decay": (optim.SGD, dict(lr=0.1, weight_decay=0.05), torch.optim.SGD, dict(lr=0.1, weight_decay=0.05)),
    "sgd-nesterov-weight-decay": (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                                  torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (optim.Adam, dict(lr=0.01), torch.optim.Adam, dict(lr=0.01)),
    "adam-weight-decay": (optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02),
                          torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02)),
    "rmsprop": (optim.RMSprop, dict(lr=0.01), torch.optim.RMSprop, dict(lr=0.01)),
    "rmsprop-momentum": (optim.RMSprop, dict(lr=0.005, alpha=0.9, momentum=0.9, weight_decay=0.01),
                         torch.optim.RMSprop, dict(lr=0.005, alpha=0.9, momentum=0.9, weight_decay=0.01)),
    "adagrad": (optim.Adagrad, dict(lr=0.1), torch.optim.Adagrad, dict(lr=0.1)),
    "adagrad-lr-decay-weight-decay": (
        optim.Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1),
        torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1)),
}


@pytest.mark.parametrize("case", list(OPT_CASES))
def test_optimizer_trajectory_matches_torch(case):
    ne_cls, ne_opts, t_cls, t_opts = OPT_CASES[case]
    rng = np.random.default_rng(16)
    model = _opt_model(rng)
    randomize_batchnorm(model, rng)
    t = as_torch(model)
    _run_trajectories(model, t, ne_cls(model, **ne_opts), t_cls(t.parameters(), **t_opts))


@pytest.mark.parametrize("opts", [dict(lr=0.1), dict(lr=0.1, weight_decay=0.05), dict(lr=0.1, reg=0.03)],
                         ids=["sgd", "weight-decay", "reg"])
@pytest.mark.parametrize("path", ["direct-blas", "direct-blas-row-blocks", "numpy-blocks"])
def test_sgd_fused_into_backward_follows_torch(opts, path, monkeypatch):
    """SGD.fuse_into_backward: the large Linear updates its weight inside backward, in one BLAS gemm
    with beta or, without it, block of rows by block of rows; "row-blocks": its weights count as large
    (nn.BLOCKED_WEIGHT_BYTES), so its input gradient is a sum over blocks of rows too (500 rows, 8 gemms), and
    on one BLAS thread its forward as well; the trajectory is still torch's (``reg`` as a parameter group on
    Linear weights)."""
    monkeypatch.setattr(blas, "threads", lambda: 1 if path.endswith("row-blocks") else 2)
    if path.endswith("row-blocks"):
        monkeypatch.setattr(nn, "BLOCKED_WEIGHT_BYTES", 1 << 20)
    direct_calls = []
    if path == "numpy-blocks":
        monkeypatch.setattr(blas, "gemm_at_b", lambda *args: False)
    else:
        real = blas.gemm_at_b
        monkeypatch.setattr(blas, "gemm_at_b", lambda *args: direct_calls.append(real(*args)) or direct_calls[-1])
    rng = np.random.default_rng(18)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 600, rng=rng), nn.ReLU(), nn.Linear(600, 500, rng=rng),
                          nn.Tanh(), nn.Linear(500, 3, rng=rng))  # 600x500 = 300,000 weights > optim.CHUNK
    t = as_torch(model)
    opt = optim.SGD(model, **opts)
    assert opt.fuse_into_backward() == 1 and model["3"].fused_update is not None
    t_opts = {k: v for k, v in opts.items() if k != "reg"}
    weights = [t[i].weight for i in (1, 3, 5)] if "reg" in opts else []  # reg: every Linear weight
    rest = [p for p in t.parameters() if all(p is not w for w in weights)]
    groups = [{"params": rest}] + ([{"params": weights, "weight_decay": opts["reg"]}] if weights else [])
    t_opt = torch.optim.SGD(groups, **t_opts)
    rng = np.random.default_rng(19)
    loss_fn = losses.CrossEntropy()
    for step in range(1, 5):
        x, y = rng.standard_normal((6, 2, 4, 4)), rng.integers(0, 3, 6)
        _, dscores = loss_fn(model(x), y)
        model.backward(dscores)
        assert "weight" not in model["3"].grads  # applied already, never stored
        opt.step()
        t_opt.zero_grad()
        F.cross_entropy(t(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        t_opt.step()
        assert_state_close(model, t, f"after step {step}")
    calls = {"direct-blas": 4, "direct-blas-row-blocks": 4 * (8 + 1), "numpy-blocks": 0}[path]
    assert direct_calls == [True] * calls, blas.source()


BUILD_CASES = {  # optim.build name -> torch optimizer with torch's own defaults
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adam": (torch.optim.Adam, {}),
}


@pytest.mark.parametrize("name", list(BUILD_CASES))
def test_optim_build_defaults_match_torch_defaults(name):
    assert set(optim.OPTIMIZERS) == set(BUILD_CASES)
    rng = np.random.default_rng(17)
    model = _opt_model(rng)
    t = as_torch(model)
    t_cls, t_opts = BUILD_CASES[name]
    _run_trajectories(model, t, optim.build(name, model, lr=0.01), t_cls(t.parameters(), lr=0.01, **t_opts))


def _reg_groups(t_model, reg, weight_decay=0.0):
    """torch parameter groups for the seed's ``reg``: Linear/Conv2d weights get ``reg``, the rest none."""
    decayed, plain = [], []
    for module in t_model.modules():
        for key, p in module.named_parameters(recurse=False):
            (decayed if isinstance(module, (tnn.Linear, tnn.Conv2d)) and key == "weight" else plain).append(p)
    assert decayed and plain
    return [{"params": decayed, "weight_decay": reg + weight_decay}, {"params": plain, "weight_decay": weight_decay}]


@pytest.mark.parametrize("ne_cls,t_cls,opts,weight_decay", [
    (optim.SGD, torch.optim.SGD, dict(lr=0.1), 0.0),
    (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), 0.0),
    (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), 0.01),
    (optim.Adam, torch.optim.Adam, dict(lr=0.01), 0.0),
], ids=["sgd", "sgd-momentum", "sgd-nesterov-plus-weight-decay", "adam"])
def test_reg_equals_torch_weight_decay_on_linear_and_conv_weights_only(ne_cls, t_cls, opts, weight_decay):
    reg = 0.05
    rng = np.random.default_rng(18)
    model = _opt_model(rng)
    randomize_batchnorm(model, rng)
    t = as_torch(model)
    _run_trajectories(model, t, ne_cls(model, reg=reg, weight_decay=weight_decay, **opts),
                      t_cls(_reg_groups(t, reg, weight_decay), **opts))
