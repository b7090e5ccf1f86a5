"""The fast im2col Conv2d against the naive loop reference."""
import tracemalloc

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from numexp import blas, kernels, nn, winograd
from numexp.gradcheck import rel_error

CASES = [  # (shape, out_channels, kernel, stride, padding)
    ((2, 3, 7, 7), 4, 3, 1, 1),
    ((1, 2, 9, 6), 3, 3, 2, 0),   # batch of 1, non-square, stride 2
    ((3, 1, 8, 8), 5, 5, 1, 2),
    ((2, 4, 5, 7), 2, 1, 1, 0),   # kernel 1
    ((2, 3, 11, 10), 4, 5, 2, 1),  # odd sizes, stride 2, padding 1
    ((1, 2, 6, 6), 3, 3, 2, 2),
    ((2, 8, 6, 7), 3, 3, 1, 1),   # im2col rows of 72 values: the unfold built again for the weight gradient
    ((3, 16, 4, 6), 5, 3, 1, 1),  # even sizes: Winograd applies
    ((2, 32, 8, 12), 6, 3, 1, 1),  # sizes of 4s: Winograd's 4x4 tiles, over as many channels as SimpleNet's conv2
]


@pytest.mark.parametrize("method", ["im2col", "im2col-slice-adds", "im2col-two-blas-threads", "im2col-pieces", "taps",
                                    "batch_last", "batch_last-pieces", "winograd", "winograd-two-blas-threads"])
@pytest.mark.parametrize("shape,f,k,stride,padding", CASES)
def test_im2col_conv_matches_naive_forward_and_backward(shape, f, k, stride, padding, method, monkeypatch):
    """"im2col-slice-adds": the input gradient by kernels.col2im_product at stride 1 too, as for
    layers with more than nn.NARROW_TAPS output channels; "im2col-two-blas-threads": the whole unfold
    kept and per-tap GEMMs, as on more than one BLAS thread; "-pieces": GEMMs cut into pieces of at
    most 1000 multiply-adds, as for OpenBLAS's small-matrix kernels (kernels.matmul_pieces); "winograd":
    where it applies (3x3, stride 1, padding 1, even sizes, one BLAS thread), else im2col."""
    if method == "im2col-slice-adds":
        monkeypatch.setattr(nn, "NARROW_TAPS", 0)
    # the unfolding follows the BLAS threads (nn.NARROW_TAPS): one unless said, whatever this machine has
    monkeypatch.setattr(blas, "threads", lambda: 2 if method.endswith("-two-blas-threads") else 1)
    # and the pieces the BLAS's small-matrix kernels: none unless said
    monkeypatch.setattr(blas, "small_gemm_limit", lambda: 1000 if method.endswith("-pieces") else 0)
    monkeypatch.setattr(kernels, "MIN_PIECE", 1)
    method = method.split("-")[0]
    rng = np.random.default_rng(0)
    fast = nn.Conv2d(shape[1], f, k, stride, padding, method=method, rng=np.random.default_rng(1))
    naive = nn.Conv2d(shape[1], f, k, stride, padding, method="naive", rng=np.random.default_rng(1))
    x = rng.standard_normal(shape).astype(np.float32)
    out_fast, out_naive = fast(x), naive(x)
    assert out_fast.shape == out_naive.shape == (shape[0], f) + fast.output_shape(shape[1:])[1:]
    assert rel_error(out_fast, out_naive) < 1e-5
    dout = rng.standard_normal(out_fast.shape).astype(np.float32)
    assert rel_error(fast.backward(dout), naive.backward(dout)) < 1e-5
    for name in ("weight", "bias"):
        assert rel_error(fast.grads[name], naive.grads[name]) < 1e-5
    applies = (k, stride, padding) == (3, 1, 1) and shape[2] % 2 == 0 == shape[3] % 2
    assert isinstance(fast._cache[1], str) == (method == "winograd" and blas.threads() == 1 and applies)


def count_matmuls(monkeypatch):
    calls = []
    matmul = np.matmul
    monkeypatch.setattr(np, "matmul", lambda *args, **kwargs: calls.append(1) or matmul(*args, **kwargs))
    return calls


@pytest.mark.parametrize("a_shape, b_shape, pieces", [((6, 25), (25, 1000), 4), ((1000, 25), (25, 6), 4),
                                                       ((6, 25), (25, 300), 1), ((6, 25), (25, 1000), 1)])
def test_matmul_pieces_cuts_the_longer_side_below_the_limit(a_shape, b_shape, pieces, monkeypatch):
    """Pieces of 300 columns (or rows) at a limit of 6*25*300: three of 300 and one of 100; one product
    when it fits whole, or (last case) when pieces would be shorter than MIN_PIECE."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    limit = 6 * 25 * (300 if pieces > 1 or b_shape[1] == 300 else 100)
    out = np.full((a_shape[0], b_shape[1]), np.nan)
    calls = count_matmuls(monkeypatch)
    assert kernels.matmul_pieces(a, b, out=out, limit=limit) is out
    assert len(calls) == pieces
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)
    assert kernels.matmul_pieces(a, b, limit=0).shape == out.shape and len(calls) == pieces + 1


def test_inner_matmul_pieces_sums_the_products_of_pieces_of_the_inner_size(monkeypatch):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((6, 1000)), rng.standard_normal((1000, 25))
    calls = count_matmuls(monkeypatch)
    got = kernels.inner_matmul_pieces(a, b, limit=6 * 25 * 300)  # 300, 300, 300 and 100 of the 1000
    np.testing.assert_allclose(got, a @ b, rtol=1e-12, atol=1e-12)
    assert len(calls) == 4
    np.testing.assert_allclose(kernels.inner_matmul_pieces(a, b, limit=0), a @ b, rtol=1e-12, atol=1e-12)


def test_col2im_product_is_the_adjoint_of_im2col_times_weights():
    # <im2col(x) @ w_rows.T, d> == <x, col2im_product(d, w_taps)> for any x and d, overlapping windows too
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 7, 6))
    col = kernels.im2col(x, 3, 3, 2, 1)  # (M, 9*C), columns (i, j, c)
    w_rows = rng.standard_normal((4, 27))  # (F, 9*C)
    d = rng.standard_normal((len(col), 4))
    w_taps = w_rows.reshape(4, 9, 3).transpose(1, 0, 2)  # the same numbers, tap-major (9, F, C)
    assert np.isclose(np.vdot(col @ w_rows.T, d), np.vdot(x, kernels.col2im_product(d, w_taps, x.shape, 3, 3, 2, 1)))


@pytest.mark.parametrize("k, stride, padding", [(3, 2, 1), (5, 1, 0), (5, 1, 2), (2, 3, 1)])
def test_col2im_batch_last_folds_like_col2im_product(k, stride, padding):
    rng = np.random.default_rng(5)
    x_shape, F = (3, 2, 9, 8), 4
    out_h, out_w = (kernels.conv_output_size(n, k, stride, padding) for n in x_shape[2:])
    d = rng.standard_normal((x_shape[0], F, out_h, out_w))
    w_rows = rng.standard_normal((F, k * k * 2))
    w_taps = w_rows.reshape(F, k * k, 2).transpose(1, 0, 2)
    expected = kernels.col2im_product(kernels.channels_last(d).reshape(-1, F), w_taps, x_shape, k, k, stride, padding)
    dx = kernels.col2im_batch_last(kernels.batch_last(d), w_rows, x_shape, k, k, stride, padding)
    assert dx.shape == x_shape and dx.strides[0] == dx.itemsize  # batch-last memory
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-12)


def test_batch_last_reads_pool_blocks_in_image_order():
    d = np.random.default_rng(6).standard_normal((3, 4, 6, 8))
    blocks = kernels.pool_blocks(d, 2)
    assert np.array_equal(kernels.batch_last(blocks, 2), kernels.batch_last(d))
    assert np.array_equal(kernels.batch_last(d).reshape(4, 6, 8, 3), d.transpose(1, 2, 3, 0))


def test_im2col_batch_last_is_im2col_transposed_with_the_batch_fastest():
    x = np.random.default_rng(7).standard_normal((3, 2, 6, 8))
    for pool in (1, 2):
        rows = kernels.im2col(x, 3, 3, 1, 1, pool)  # rows (taps..., n, grid...), columns (i, j, c)
        col = kernels.im2col_batch_last(x, 3, 3, 1, 1, pool)
        grid = (2, 2, 3, 3, 4) if pool > 1 else (3, 6, 8)  # (taps..., n, grid...)
        n_axis = 2 if pool > 1 else 0
        expected = np.moveaxis(rows.reshape(grid + (18,)), n_axis, -2)  # the batch fastest
        assert np.array_equal(col, expected.reshape(-1, 18).T)


@pytest.mark.parametrize("pool, stride", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("chunk_bytes", [1, 3000, 10**6], ids=["one-row", "uneven", "one-chunk"])
def test_batch_last_matmul_is_the_product_with_the_unfold(pool, stride, chunk_bytes):
    """Chunks of output rows (per pooling-window tap) in one reused buffer: the same product as with the
    whole unfold; unfolds up to whole_bytes are built whole."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 2, 11, 9) if stride > 1 else (3, 2, 8, 8))
    w_rows = rng.standard_normal((4, 5 * 5 * 2))
    expected = w_rows @ kernels.im2col_batch_last(x, 5, 5, stride, 2, pool)
    out = kernels.batch_last_matmul(x, w_rows, 5, 5, stride, 2, pool, chunk_bytes=chunk_bytes, whole_bytes=0)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert np.array_equal(kernels.batch_last_matmul(x, w_rows, 5, 5, stride, 2, pool), expected)


@pytest.mark.parametrize("k, padding", [(3, 1), (3, 0), (5, 2), (5, 4), (1, 0), (2, 1)])
def test_input_grad_by_convolution_is_col2im_product(k, padding):
    """Stride 1: the flipped-kernel convolution of d folds the patch gradients like the per-tap slice-adds."""
    rng = np.random.default_rng(9)
    x_shape, F = (3, 4, 7, 6), 5
    out_h, out_w = (kernels.conv_output_size(n, k, 1, padding) for n in x_shape[2:])
    d = rng.standard_normal((x_shape[0] * out_h * out_w, F))
    weight = rng.standard_normal((F, x_shape[1], k, k))
    w_taps = np.ascontiguousarray(weight.transpose(2, 3, 0, 1).reshape(k * k, F, -1))  # (k*k, F, C)
    expected = kernels.col2im_product(d, w_taps, x_shape, k, k, 1, padding)
    np.testing.assert_allclose(kernels.input_grad_by_convolution(d, weight, x_shape, padding), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels, pool, chunk_bytes", [(8, 1, 60000), (8, 2, 90000), (8, 2, 1), (2, 1, 10)])
def test_im2col_matmul_in_sample_chunks_is_one_unfold_and_one_product(channels, pool, chunk_bytes):
    """Chunks of 2, 3 and 1 samples (27.6 kB each: uneven last ones); 18-float rows (narrow) in one piece."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, channels, 6, 8))
    w_rows = rng.standard_normal((3, 9 * channels))
    col, out = kernels.im2col_matmul(x, w_rows, 3, 3, 1, 1, pool, chunk_bytes=chunk_bytes)
    expected = kernels.im2col(x, 3, 3, 1, 1, pool)
    assert np.array_equal(col, expected)
    np.testing.assert_allclose(out, expected @ w_rows.T, rtol=1e-12)


@pytest.mark.parametrize("channels, stride, pool, chunk_bytes",
                         [(8, 1, 1, 60000), (8, 1, 2, 90000), (8, 2, 1, 30000), (8, 1, 2, 1), (2, 1, 1, 10)])
def test_im2col_matmul_without_col_gives_the_same_products_bit_for_bit(channels, stride, pool, chunk_bytes):
    """One reused chunk buffer (uneven last chunks, narrow rows chunked too): the same bits, no col."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, channels, 6, 8)).astype(np.float32)
    w_rows = rng.standard_normal((3, 9 * channels)).astype(np.float32)
    _, kept = kernels.im2col_matmul(x, w_rows, 3, 3, stride, 1, pool, chunk_bytes=chunk_bytes)
    col, out = kernels.im2col_matmul(x, w_rows, 3, 3, stride, 1, pool, chunk_bytes=chunk_bytes, keep_col=False)
    assert col is None
    assert out.shape == kept.shape and np.array_equal(out, kept)


@pytest.mark.parametrize("stride, pool, chunk_bytes", [(1, 1, 60000), (1, 2, 90000), (2, 1, 30000), (1, 2, 1)])
def test_im2col_weight_grad_is_the_product_with_the_whole_unfold(stride, pool, chunk_bytes):
    """Chunks of samples (uneven last ones, one sample at a time): the same sum as d.T @ im2col(x)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 8, 6, 8))
    col = kernels.im2col(x, 3, 3, stride, 1, pool)
    d = rng.standard_normal((len(col), 4))
    got = kernels.im2col_weight_grad(x, d, 3, 3, stride, 1, pool, chunk_bytes=chunk_bytes)
    np.testing.assert_allclose(got, d.T @ col, rtol=1e-12)


@pytest.mark.parametrize("blas_threads", [1, 2])
def test_conv_keeps_the_unfold_only_where_its_blas_threads_gain_from_it(blas_threads):
    """Stride 1, rows of 144 values: on one BLAS thread no unfold is kept, in training or eval; on two
    the whole unfold is (its one large GEMM splits better over threads than chunks in cache)."""
    rng = np.random.default_rng(3)
    conv = nn.Conv2d(16, 8, 3, padding=1, method="im2col", rng=rng)
    x = rng.standard_normal((4, 16, 6, 6)).astype(np.float32)
    with threadpool_limits(blas_threads, user_api="blas"):
        if blas.threads() != blas_threads:
            pytest.skip(f"OpenBLAS runs on {blas.threads()} thread(s) here, not {blas_threads}")
        for training in (True, False):
            conv.train(training)
            conv.forward(x)
            assert (conv._cache[1] is not None) == (blas_threads > 1), training


def test_conv_in_eval_mode_keeps_no_unfold_and_backward_still_works(monkeypatch):
    """Eval output bit for bit the training one; no col in the cache, and no col-sized allocation (the
    unfold of this input is 4.7 MB); a backward after an eval pass gives the training pass's gradients.
    On one BLAS thread, where both passes build the unfold in chunks (the training pass keeps none
    either: 144-value rows, stride 1)."""
    monkeypatch.setattr(blas, "threads", lambda: 1)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((32, 16, 16, 16)).astype(np.float32)
    conv = nn.Conv2d(16, 32, 3, padding=1, method="im2col", rng=rng)
    dout = rng.standard_normal((32, 32, 16, 16)).astype(np.float32)
    trained = conv.forward(x)
    expected = [conv.backward(dout), dict(conv.grads)]
    conv.eval()
    tracemalloc.start()
    out = conv.forward(x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(out, trained)
    assert conv._cache[1] is None and peak < out.nbytes + 2 * 2**20, peak
    dx = conv.backward(dout)
    assert np.array_equal(dx, expected[0])
    for name, grad in expected[1].items():
        assert np.array_equal(conv.grads[name], grad), name


@pytest.mark.parametrize("whole_bytes", [0, 6 << 20], ids=["chunks", "whole"])
def test_batch_last_conv_in_eval_mode_keeps_no_unfold_and_backward_still_works(whole_bytes, monkeypatch):
    """A batch-last conv in eval: the training output (up to rounding where the unfold goes in chunks),
    no col in the cache, and a backward after it gives the training pass's gradients, bit for bit."""
    monkeypatch.setattr(kernels, "WHOLE_BATCH_LAST", whole_bytes)
    rng = np.random.default_rng(13)
    conv = nn.Conv2d(2, 4, 5, padding=2, method="batch_last", rng=rng)
    x = rng.standard_normal((3, 2, 8, 8))
    dout = rng.standard_normal((3, 4, 8, 8))
    trained = conv.forward(x)
    expected = [conv.backward(dout), dict(conv.grads)]
    conv.eval()
    out = conv.forward(x)
    np.testing.assert_allclose(out, trained, rtol=1e-12, atol=1e-12)
    assert conv._cache[1] is None
    assert np.array_equal(conv.backward(dout), expected[0])
    for name, grad in expected[1].items():
        assert np.array_equal(conv.grads[name], grad), name


def test_col2im_taps_is_the_adjoint_of_im2col_taps():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 6))
    col = kernels.im2col_taps(x, 3, 3, 2, 1)  # (N, 9*C, out_h*out_w), rows (c, i, j)
    c = rng.standard_normal(col.shape)
    assert np.isclose(np.vdot(col, c), np.vdot(x, kernels.col2im_taps(c, x.shape, 3, 3, 2, 1)))
    rows = kernels.im2col(x, 3, 3, 2, 1)  # (N*out_h*out_w, 9*C), columns (i, j, c)
    assert np.array_equal(col, rows.reshape(2, -1, 3, 3, 3).transpose(0, 4, 2, 3, 1).reshape(2, 27, -1))


def test_auto_method_picks_the_unfold_by_channels_and_kernel_size():
    assert nn.Conv2d(1, 6, 5).method == nn.Conv2d(6, 16, 5).method == "batch_last"
    assert nn.Conv2d(1, 6, 3).method == "taps"
    assert nn.Conv2d(6, 16, 3).method == nn.Conv2d(16, 16, 5).method == "im2col"


def test_conv_keeps_float32():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = np.ones((2, 3, 5, 5), dtype=np.float32)
    out = conv(x)
    assert out.dtype == np.float32
    assert conv.backward(np.ones_like(out)).dtype == np.float32
    assert conv.grads["weight"].dtype == np.float32


def test_unknown_conv_method_is_refused():
    with pytest.raises(ValueError, match="im2col"):
        nn.Conv2d(1, 1, 3, method="fft")


def test_first_layer_can_skip_its_input_gradient():
    from numexp import models
    model = models.build("simple_convnet", (1, 12, 12), 3)
    x = np.ones((2, 1, 12, 12), dtype=np.float32)
    scores = model(x)
    assert model.backward(np.ones_like(scores)).shape == x.shape
    weight_grad = model["conv1"].grads["weight"].copy()
    model.set_input_grad(False)
    model(x)
    assert model.backward(np.ones_like(scores)) is None
    np.testing.assert_array_equal(model["conv1"].grads["weight"], weight_grad)


@pytest.mark.parametrize("m, f", [(65536, 32), (6400, 16), (7, 3), (1, 600), (12, 1000)])
def test_add_channel_bias_adds_the_bias_to_every_row_in_place(m, f):
    rng = np.random.default_rng(0)
    rows, bias = rng.standard_normal((m, f)), rng.standard_normal(f)
    expected = rows + bias
    assert kernels.add_channel_bias(rows, bias) is rows
    np.testing.assert_array_equal(rows, expected)


@pytest.mark.parametrize("layout", ["channels-last", "nchw", "batch-last"])
def test_channel_affine_maps_each_channel_in_any_memory_layout(layout):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 6, 3, 5))
    x = {"channels-last": np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
         "nchw": x, "batch-last": np.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)}[layout]
    scale, shift = rng.standard_normal(6), rng.standard_normal(6)
    out = kernels.channel_affine(x, scale, shift)
    np.testing.assert_allclose(out, x * scale[:, None, None] + shift[:, None, None], rtol=1e-14)
    assert out.strides == x.strides  # in x's memory layout
    np.testing.assert_allclose(kernels.channel_affine(x, scale), x * scale[:, None, None], rtol=1e-14)


def test_channel_affine_object_tiles_once_per_row_width_and_maps_every_shape_right(monkeypatch):
    """PoolFirst's backward maps every chunk of every tap with one ChannelAffine: each row width
    (at width 512: 16 rows of 32 channels a wide row, and 1 where 75 rows share no factor with 16) gets its own
    tiles, made once, and no chunk is mapped with another width's tiles."""
    rng = np.random.default_rng(3)
    scale, shift = rng.standard_normal(32).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    tiles = []
    real_tile = np.tile
    monkeypatch.setattr(np, "tile", lambda v, r: tiles.append(r) or real_tile(v, r))
    affine = kernels.ChannelAffine(scale, shift, width=512)
    for shape in [(8, 16, 16), (3, 5, 5), (8, 16, 16), (2, 8, 8), (3, 5, 5)]:
        x = rng.standard_normal(shape + (32,)).astype(np.float32).transpose(0, 3, 1, 2)  # channels-last
        out = np.empty_like(x)
        assert affine(x, out=out) is out
        np.testing.assert_allclose(out, x * scale[:, None, None] + shift[:, None, None], rtol=1e-6)
    assert sorted(tiles) == [1, 1, 16, 16]  # scale and shift, for r = 16 and r = 1 only


def test_wide_channel_rows_line_up_with_tiled_vectors_and_leave_strided_rows_alone():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64 * 49, 16)).astype(np.float32)
    v = rng.standard_normal(16).astype(np.float32)
    wide, r = kernels.wide_channel_rows(rows)
    assert r > 1 and wide.shape == (rows.shape[0] // r, 16 * r) and np.shares_memory(wide, rows)
    np.testing.assert_array_equal((wide - np.tile(v, r)).reshape(rows.shape), rows - v)
    strided = np.asfortranarray(rows)
    got, r = kernels.wide_channel_rows(strided)
    assert got is strided and r == 1


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_over_wide_rows_gives_the_bits_of_broadcasting(monkeypatch, training):
    """BatchNorm2d's per-channel maps run over wide rows (16 channels: 2.4x faster a pass); the
    values, gradients and running statistics are those of plain broadcasting, bit for bit."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 6, 5, 16)).astype(np.float32).transpose(0, 3, 1, 2)  # channels-last
    dout = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    for wide in (True, False):
        if not wide:
            monkeypatch.setattr(kernels, "wide_channel_rows", lambda rows, width=512: (rows, 1))
        bn = nn.BatchNorm2d(16)
        bn.params["weight"][:] = np.linspace(0.5, 2, 16)
        bn.buffers["running_mean"][:] = 0.1
        bn.train(training)
        out = bn.forward(x)
        results.append([out, bn.backward(dout), bn.grads["weight"], bn.buffers["running_mean"].copy()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["im2col", "taps", "batch_last", "naive"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_eval_conv_bn_runs_folded_with_the_layers_own_gradients(method, bias, relu):
    """In eval mode a Sequential runs Conv2d -> BatchNorm2d [-> ReLU] as one nn.ConvBN, the BN folded
    into the conv's weight and bias: the layers' output up to rounding (float64), with no pass of
    its own. A backward after it gives the layers' own gradients, bit for bit; nothing is changed
    in the parameters, the input or the statistics."""
    rng = np.random.default_rng(12)
    layers = [nn.Conv2d(3, 4, 3, padding=1, bias=bias, method=method, rng=rng), nn.BatchNorm2d(4)]
    layers += [nn.ReLU()] if relu else []
    for layer in layers:
        for key, value in layer.params.items():
            layer.params[key] = value.astype(np.float64)
    bn = layers[1]
    bn.params["weight"][...] = [0.7, -1.3, 0.2, 1.1]  # a negative scale folds too
    bn.params["bias"][...] = [0.1, -0.4, 0.3, 0.0]
    bn.buffers["running_mean"] = np.array([0.5, -0.2, 0.1, 0.3])
    bn.buffers["running_var"] = np.array([0.6, 1.7, 0.9, 2.0])
    seq = nn.Sequential(*layers).eval()
    x = rng.standard_normal((2, 3, 6, 5))
    before = {name: p.copy() for name, p in seq.state_dict().items()}, x.copy()

    out = seq(x)
    assert [type(step).__name__ for step in seq._ran] == ["ConvBN"]
    expected = x
    for layer in layers:
        expected = layer.forward(expected)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert not np.array_equal(out, layers[0].forward(x))  # the BN did something

    dout = rng.standard_normal(out.shape)
    seq(x)
    dx = seq.backward(dout)
    grads = {id(layer): dict(layer.grads) for layer in layers}
    h = x  # the reference: the layers one by one, forward then backward
    for layer in layers:
        h = layer.forward(h)
    d = dout
    for layer in reversed(layers):
        d = layer.backward(d)
    assert np.array_equal(dx, d)
    for layer in layers:
        for key, grad in layer.grads.items():
            assert np.array_equal(grads[id(layer)][key], grad), (type(layer).__name__, key)
    assert all(np.array_equal(p, before[0][name]) for name, p in seq.state_dict().items())
    assert np.array_equal(x, before[1])


@pytest.mark.parametrize("chunk_samples", [1, 2])
@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("dout_layout", ["as-returned", "image"])
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_conv_matches_naive_in_float64_in_chunks_and_pool_blocks(tile, chunk_samples, pool, dout_layout,
                                                                          monkeypatch):
    """Three samples in chunks of one or two (the last chunk short), the output whole or as 2x2 pool blocks
    (F(2x2, 3x3)'s tiles; four of them to one of F(4x4, 3x3)'s), and a gradient in the returned layout or as a
    plain (N, F, H, W) image (a pool-first group that declined the blocks): exact up to float64 rounding. An
    image of 6 rows cuts into 2x2 tiles only; 8 x 12 into 4x4 ones."""
    monkeypatch.setattr(blas, "threads", lambda: 1)
    (shape, tiling), f = ((3, 5, 6, 8), winograd.F2) if tile == 2 else ((3, 5, 8, 12), winograd.F4), 4
    H, W = shape[2:]
    # float64 bytes of a chunk's arrays
    per_sample = tiling.n ** 2 * (H // tile) * (W // tile) * (shape[1] + f) * 8
    monkeypatch.setattr(winograd, "CHUNK_BYTES", per_sample * chunk_samples)
    rng = np.random.default_rng(11)
    fast = nn.Conv2d(shape[1], f, 3, 1, 1, method="winograd", rng=np.random.default_rng(1))
    naive = nn.Conv2d(shape[1], f, 3, 1, 1, method="naive", rng=np.random.default_rng(1))
    for layer in (fast, naive):
        layer.params = {k: v.astype(np.float64) for k, v in layer.params.items()}
    x = rng.standard_normal(shape)
    fast.pool_blocks = pool
    out = fast(x)
    assert fast._cache[1] == "winograd" and fast._cache[4] is tiling
    assert out.shape == ((4, 3, f, H // 2, W // 2) if pool == 2 else (3, f, H, W))
    expected = naive(x)
    image = kernels.unpool_blocks(out, 2) if pool == 2 else out
    np.testing.assert_allclose(image, expected, rtol=1e-12, atol=1e-12)
    dout_image = rng.standard_normal(expected.shape)
    if dout_layout == "image" or pool == 1:
        dout = dout_image
    else:  # the blocks' own memory layout, as a pool-first group sends them back
        dout = np.empty_like(out)
        dout[...] = kernels.pool_blocks(dout_image, 2)
    np.testing.assert_allclose(fast.backward(dout), naive.backward(dout_image), rtol=1e-12, atol=1e-12)
    for name in ("weight", "bias"):
        np.testing.assert_allclose(fast.grads[name], naive.grads[name], rtol=1e-12, atol=1e-12)


def test_auto_picks_winograd_for_3x3_same_convolutions_from_32_input_channels():
    assert nn.Conv2d(32, 64, 3, padding=1).method == "winograd"  # SimpleNet's conv2
    assert nn.Conv2d(3, 32, 3, padding=1).method == "im2col"     # its conv1: measured slower as Winograd
    assert nn.Conv2d(8, 8, 3, padding=1).method == "im2col"
    assert nn.Conv2d(32, 64, 3, stride=2, padding=1).method == "im2col"
    assert nn.Conv2d(32, 64, 5, padding=2).method == "im2col"


@pytest.mark.parametrize("size,runs", [((8, 12), "winograd-4x4"), ((6, 10), "im2col")])
def test_auto_winograd_from_16_channels_runs_only_with_4x4_tiles(size, runs, monkeypatch):
    """resnet_small's 16 -> 16 layers gain from Winograd only with 4x4 tiles: "auto" makes them Winograd
    layers that run im2col where the input does not cut into 4x4 tiles. Asked for by name, Winograd takes
    2x2 tiles there."""
    monkeypatch.setattr(blas, "threads", lambda: 1)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 16) + size)
    auto, named, naive = (nn.Conv2d(16, 16, 3, padding=1, method=m, rng=np.random.default_rng(2))
                          for m in ("auto", "winograd", "naive"))
    assert auto.method == "winograd"
    for layer in (auto, named, naive):
        layer.params = {k: v.astype(np.float64) for k, v in layer.params.items()}
    expected = naive(x)
    np.testing.assert_allclose(auto(x), expected, rtol=1e-12, atol=1e-12)
    assert (auto._cache[1] == "winograd" and auto._cache[4] is winograd.F4) == (runs == "winograd-4x4")
    assert isinstance(auto._cache[1], str) == (runs != "im2col")
    np.testing.assert_allclose(named(x), expected, rtol=1e-12, atol=1e-12)
    assert named._cache[1] == "winograd" and named._cache[4] is (winograd.F4 if runs != "im2col" else winograd.F2)


@pytest.mark.parametrize("size", [(6, 4), (8, 4)], ids=["2x2-tiles", "4x4-tiles"])
@pytest.mark.parametrize("pool", [1, 2])
def test_winograd_conv_stays_float32(pool, size, monkeypatch):
    """No float64 from the transforms' matrices (kept in float64, cast to the data's type on use)."""
    monkeypatch.setattr(blas, "threads", lambda: 1)
    rng = np.random.default_rng(12)
    conv = nn.Conv2d(32, 8, 3, padding=1, rng=rng)
    conv.pool_blocks = pool
    out = conv(rng.standard_normal((2, 32) + size).astype(np.float32))
    assert conv._cache[1] == "winograd" and conv._cache[3].dtype == np.float32  # the kept transformed input
    dx = conv.backward(np.ones_like(out))
    assert out.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in conv.grads.values())


@pytest.mark.parametrize("layout", ["channels-last", "batch-last"])
@pytest.mark.parametrize("affine", [False, True], ids=["max-pool", "with-batchnorm"])
def test_pool_first_backward_over_blocks_is_the_same_in_chunks_of_samples(affine, layout, monkeypatch):
    """PoolFirst's backward over pool blocks runs a chunk of samples at a time where each tap's memory is
    sample by sample: chunks of one and of two samples (a short last one) give the whole batch's dx exactly,
    ties at the first maximum included. Batch-last blocks (a strided slice per chunk) go whole."""
    rng = np.random.default_rng(5)
    N, C, P = 5, 3, 4
    if layout == "channels-last":
        memory = rng.integers(-2, 3, size=(4, N, P, P, C)).astype(np.float64)  # repeats: tied maxima
        blocks = memory.transpose(0, 1, 4, 2, 3)  # (tap, n, C, ph, pw) over channels-last memory
    else:
        memory = rng.integers(-2, 3, size=(4, C, P, P, N)).astype(np.float64)
        blocks = memory.transpose(0, 4, 1, 2, 3)
    pooled = np.maximum(np.maximum(blocks[0], blocks[1]), np.maximum(blocks[2], blocks[3]))  # blocks' order
    g = np.empty_like(pooled)
    g[...] = rng.standard_normal(pooled.shape)
    c1, c0 = (rng.standard_normal(C), rng.standard_normal(C)) if affine else (None, None)
    whole = nn.PoolFirst._backward_blocks(blocks, pooled, g, c1, c0, chunk_bytes=1 << 30)
    per_sample = g[:1].nbytes
    chunks, first_maxima = [], kernels.first_maxima
    monkeypatch.setattr(kernels, "first_maxima", lambda taps, out: chunks.append(out.shape[0]) or first_maxima(taps, out))
    tiles, tile = [], np.tile
    monkeypatch.setattr(np, "tile", lambda v, r: tiles.append(r) or tile(v, r))
    for chunk_bytes in (per_sample, 2 * per_sample):
        chunks.clear()
        tiles.clear()
        dx = nn.PoolFirst._backward_blocks(blocks, pooled, g, c1, c0, chunk_bytes=chunk_bytes)
        np.testing.assert_array_equal(dx, whole)
        assert dx.strides == blocks.strides
        step = chunk_bytes // per_sample if layout == "channels-last" else N
        assert chunks == [min(step, N - n) for n in range(0, N, step)]
        # the affine map's two vectors tiled once for each row width, not for each chunk's four taps
        assert len(tiles) <= (4 if c1 is not None and layout == "channels-last" else 0)
    # the first maximum of each window takes g; the rest only the affine part
    first = np.argmax(blocks == pooled, axis=0)
    expected = (np.zeros_like(blocks) if c1 is None
                else blocks * c1[:, None, None] + c0[:, None, None])
    for t in range(4):
        expected[t] += np.where(first == t, g, 0.0)
    np.testing.assert_allclose(whole, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("runs", [True, False], ids=["runs-as-items", "strided"])
def test_unfold_chunks_copy_runs_of_pixels_as_items_or_value_by_value(runs):
    """_unfold_chunks copies each patch row's (kw, C) run as one opaque item where it is one contiguous run
    (every unfold of padded channels-last memory), value by value where it is not; both give the patches."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5, 6, 4)).astype(np.float32)  # (N, H, W, C)
    if not runs:
        x = np.asfortranarray(x)  # channels no longer adjacent: no runs
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    assert (kernels._as_runs(patches) is not None) == runs
    col = np.empty(patches.shape, dtype=np.float32)
    chunks = list(kernels._unfold_chunks(patches, 0, 2, col))
    assert [n for n, _ in chunks] == [0, 2]
    np.testing.assert_array_equal(col, patches)
