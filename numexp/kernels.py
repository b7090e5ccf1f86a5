"""Array kernels behind the layers: output sizes, im2col and its adjoint, pool blocks, window taps.

Plain functions on NumPy arrays. They loop over kernel taps and pooling-window taps (at
most kh*kw*pool*pool iterations) and, for cache blocking, over chunks of about a megabyte of samples
(:func:`im2col_matmul`) or of output rows (:func:`batch_last_matmul`), never over single samples or pixels.
"""
import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from numexp import blas

# im2col_matmul: the unfolded patches of this many bytes at a time, for rows this wide or wider
CHUNK_BYTES = 1 << 20
WIDE_ROWS = 64
# the largest batch-last unfold an evaluation pass builds whole (see batch_last_matmul)
WHOLE_BATCH_LAST = 6 << 20
# matmul_pieces: no pieces shorter than this (each is one more NumPy call)
MIN_PIECE = 256


def conv_output_size(size, kernel_size, stride=1, padding=0):
    """Output length of a convolution or pooling along one axis.

    ``(size + 2*padding - kernel_size) // stride + 1``; may be < 1 when the
    window does not fit, which callers turn into a clear error.
    """
    return (size + 2 * padding - kernel_size) // stride + 1


def matmul_pieces(a, b, out=None, limit=None):
    """``a @ b`` for 2-D a (M, K) and b (K, N), cut along a's rows or b's columns (the longer) into
    pieces of at most ``limit`` multiply-adds (default :func:`numexp.blas.small_gemm_limit`), which
    OpenBLAS's small-matrix kernels take; one product where it has none or the pieces would be short.

    The convolutions of few channels are long, narrow GEMMs (LeNet-5's conv1: 6 x 25 weights by
    50176 columns); on a Xeon with OpenBLAS's AVX-512 kernels, one thread, as one product and in
    pieces: LeNet-5's conv1 forward 0.68 -> 0.25 ms, SimpleConvNet's 0.92 -> 0.60. Not every shape
    gains: im2col rows by transposed weights (SimpleNet's conv1, 65536 x 27 by 27 x 32) took 1.25 ms
    whole and 1.37 in pieces, so :func:`im2col_matmul` does not cut them.
    """
    limit = blas.small_gemm_limit() if limit is None else limit
    (M, K), N = a.shape, b.shape[1]
    along_rows = M > N
    step = limit // (K * (N if along_rows else M)) if limit else 0
    if step < MIN_PIECE or step >= (M if along_rows else N):
        return np.matmul(a, b, out=out)
    out = np.empty((M, N), dtype=np.result_type(a, b)) if out is None else out
    for start in range(0, M if along_rows else N, step):
        piece = slice(start, start + step)
        if along_rows:
            np.matmul(a[piece], b, out=out[piece])
        else:
            np.matmul(a, b[:, piece], out=out[:, piece])
    return out


def inner_matmul_pieces(a, b, limit=None):
    """``a @ b`` for 2-D a (M, K) and b (K, N) with a long inner size K (a weight gradient: the sum
    over every output pixel of every sample), as the sum of the products of pieces of K of at most
    ``limit`` multiply-adds each, as :func:`matmul_pieces` does.

    Xeon, AVX-512 kernels, one thread: LeNet-5's conv1 weight gradient 0.81 -> 0.32 ms, its conv2's
    0.62 -> 0.41, SimpleConvNet's conv1 1.18 -> 0.75; SimpleNet's conv1 backward 3.10 -> 2.65 ms.
    """
    limit = blas.small_gemm_limit() if limit is None else limit
    (M, K), N = a.shape, b.shape[1]
    step = limit // (M * N) if limit else 0
    if step < MIN_PIECE or step >= K:
        return a @ b
    out = np.matmul(a[:, :step], b[:step])
    piece = np.empty_like(out)
    for start in range(step, K, step):
        out += np.matmul(a[:, start:start + step], b[start:start + step], out=piece)
    return out


def pad2d(x, padding):
    """Zero-pad the two spatial axes of an (N, C, H, W) array."""
    if padding == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


def channels_last(x):
    """The (N, H, W, C) view of an (N, C, H, W) array; free when its memory is already channels-last.

    numexp's convolutions return NCHW-shaped views of channels-last memory, so the layers in
    between (BatchNorm, ReLU, pooling) and the next convolution work on it without a copy.
    """
    return x.transpose(0, 2, 3, 1)


def channels_first(x):
    """The (N, C, H, W) view of an (N, H, W, C) array (inverse of :func:`channels_last`)."""
    return x.transpose(0, 3, 1, 2)


def pad_nhwc(x, padding):
    """Zero-pad the spatial axes of an (N, H, W, C) array into a new channels-last array."""
    if padding == 0:
        return x
    N, H, W, C = x.shape
    xp = np.zeros((N, H + 2 * padding, W + 2 * padding, C), dtype=x.dtype)
    xp[:, padding:padding + H, padding:padding + W, :] = x
    return xp


def im2col(x, kh, kw, stride=1, padding=0, pool=1):
    """Unfold image patches into rows, channels fastest.

    Shape:
        x: (N, C, H, W) (any memory layout) -> col: (N*out_h*out_w, kh*kw*C), rows ordered
        (n, oh, ow), columns ordered (i, j, c), so ``col @ w.transpose(0, 2, 3, 1).reshape(F, -1).T``
        is the convolution with a torch-layout weight w (F, C, kh, kw).

        With ``pool`` > 1 (out_h and out_w multiples of it) the rows are ordered (a, b, n, ph, pw)
        for output pixel (pool*ph + a, pool*pw + b): the convolution's output then comes in
        :func:`pool_blocks`, each tap of a pool x pool window one contiguous block.

    One strided view of the padded channels-last input and one copy: no loop at all.
    """
    patches, _ = _patches(x, kh, kw, stride, padding, pool)
    return patches.reshape(-1, kh * kw * x.shape[1])


def im2col_matmul(x, w_rows, kh, kw, stride=1, padding=0, pool=1, chunk_bytes=CHUNK_BYTES, keep_col=True):
    """``(col, col @ w_rows.T)`` with col = :func:`im2col` of x (same arguments), built and multiplied a
    few samples at a time when its rows are wide (kh*kw*C >= :data:`WIDE_ROWS`) or when col is not kept.

    Shape:
        w_rows: (F, kh*kw*C) -> col: (M, kh*kw*C), out: (M, F), rows ordered as :func:`im2col`'s.

    OpenBLAS copies the whole of col once more into its packed panels; a chunk of about
    ``chunk_bytes`` is still in cache when it does. SimpleNet's conv2 forward (64 x 32 x 16 x 16,
    col of 18.9 MB): 9.2-9.3 -> 8.1-8.2 ms at one thread; conv1 (27-float rows) gained nothing.

    With ``keep_col=False`` (nothing will need col: an evaluation pass, or a backward that builds it
    again, :func:`im2col_weight_grad`) every chunk goes through one reused buffer of about
    ``chunk_bytes`` and col comes back as None: the same products without writing col out to memory.
    One thread: resnet_small's 16-channel 3x3 convolution at 28x28 5.7 -> 4.8 ms, SimpleNet's conv2
    7.9 -> 7.3 ms.
    """
    patches, lead = _patches(x, kh, kw, stride, padding, pool)
    N, K, F = x.shape[0], kh * kw * x.shape[1], w_rows.shape[0]
    taps, step = _chunking(patches, lead, chunk_bytes)
    if K < WIDE_ROWS and keep_col:
        step = N
    col = np.empty(patches.shape, dtype=x.dtype) if keep_col else _chunk_buffer(patches, lead, step)
    out = np.empty((taps, N, patches.size // (taps * N * K), F), dtype=np.result_type(x, w_rows))
    for n, chunk in _unfold_chunks(patches, lead, step, col):
        np.matmul(chunk.reshape(taps, -1, K), w_rows.T, out=out[:, n:n + step].reshape(taps, -1, F))
    return (col.reshape(-1, K) if keep_col else None), out.reshape(-1, F)


def im2col_weight_grad(x, d, kh, kw, stride=1, padding=0, pool=1, chunk_bytes=CHUNK_BYTES):
    """``d.T @ im2col(x)`` (same arguments) with the unfold built a few samples at a time into one reused
    buffer, each chunk multiplied while in cache, as :func:`im2col_matmul` does without keeping col.

    Shape:
        x: (N, C, H, W); d: (M, F), rows ordered as :func:`im2col`'s -> (F, kh*kw*C)

    Building col again costs a copy, but writing it out in the forward pass and reading it back here
    cost more: for resnet_small's 16-channel 3x3 layers at 28x28 (col of 29 MB) the forward pass
    5.7 -> 4.8 ms and this 5.0 -> 4.7 ms at one thread; SimpleNet's conv2 7.9 -> 7.3 and 7.5 -> 7.6 ms.
    Chunks of 1 MB rather than 2 (a Xeon, one thread; 256 and 512 kB measured alike): resnet_small's
    16-channel layer 4.64 -> 4.23 ms, SimpleNet's conv2 6.17 -> 5.66 ms; resnet_small's training step
    75.9 -> 74.1 ms (11 alternating rounds).
    """
    patches, lead = _patches(x, kh, kw, stride, padding, pool)
    N, K, F = x.shape[0], kh * kw * x.shape[1], d.shape[1]
    taps, step = _chunking(patches, lead, chunk_bytes)
    rows = d.reshape(taps, N, -1, F)  # (tap, n, pixel, F), as col's rows
    grad = np.zeros((F, K), dtype=np.result_type(x, d))
    for n, chunk in _unfold_chunks(patches, lead, step, _chunk_buffer(patches, lead, step)):
        # (taps, F, rows) @ (taps, rows, K): one product per pooling-window tap, summed
        product = np.matmul(rows[:, n:n + step].reshape(taps, -1, F).transpose(0, 2, 1), chunk.reshape(taps, -1, K))
        grad += product[0] if taps == 1 else product.sum(axis=0)
    return grad


def _chunking(patches, lead, chunk_bytes):
    """(taps, step): the number of pooling-window taps of :func:`_patches`' view, and how many samples'
    unfold make about ``chunk_bytes`` (at least one)."""
    taps = int(np.prod(patches.shape[:lead], dtype=int))
    return taps, max(1, chunk_bytes // (patches.nbytes // patches.shape[lead]))


def _chunk_buffer(patches, lead, step):
    """An empty unfold of ``step`` samples, (taps..., step, grid..., kh, kw, C), to reuse for every chunk."""
    step = min(step, patches.shape[lead])
    return np.empty(patches.shape[:lead] + (step,) + patches.shape[lead + 1:], dtype=patches.dtype)


def _unfold_chunks(patches, lead, step, col):
    """Copy the unfold of ``step`` samples at a time into ``col`` (the whole unfold, or a
    :func:`_chunk_buffer`) and yield (first sample, that chunk of col)."""
    N, every_tap = patches.shape[lead], (slice(None),) * lead
    for n in range(0, N, step):
        samples = every_tap + (slice(n, n + step),)
        chunk = col[samples] if col.shape[lead] == N else col[every_tap + (slice(0, min(step, N - n)),)]
        source = patches[samples]
        into, runs = _as_runs(chunk), _as_runs(source)
        if into is None or runs is None:
            np.copyto(chunk, source)
        else:
            np.copyto(into, runs)
        yield n, chunk


def _as_runs(a):
    """a (..., kw, C) with its last two axes one contiguous run of kw*C values, viewed as one opaque item per run
    (..., ), or None where they are not one run. NumPy copies runs of a few floats one inner loop each; copied as
    items, the loop goes over the axis before: SimpleNet's conv1 unfold (runs of 9 floats) 0.99 -> 0.62 ms."""
    kw, C = a.shape[-2:]
    if a.strides[-1] != a.itemsize or a.strides[-2] != C * a.itemsize:
        return None
    merged = a.reshape(a.shape[:-2] + (kw * C,))  # a view: the two axes are one run
    return merged.view(np.dtype((np.void, kw * C * a.itemsize)))[..., 0]


def _patches(x, kh, kw, stride, padding, pool):
    """(patches, number of tap axes): the read-only strided view of x's patches that :func:`im2col`
    copies, shaped (taps..., N, grid..., kh, kw, C); no tap axes without pooling."""
    N, C, H, W = x.shape
    out_h = conv_output_size(H, kh, stride, padding)
    out_w = conv_output_size(W, kw, stride, padding)
    xp = pad_nhwc(channels_last(x), padding)
    if not xp.flags.c_contiguous:
        # e.g. channel-major memory from a "taps" layer: the strided copy below would gather each
        # patch's channels from far apart; one compact channels-last copy first is far cheaper
        xp = np.ascontiguousarray(xp)
    sn, sh, sw, sc = xp.strides
    (taps, tap_strides), (grid, grid_strides) = _output_pixels(out_h, out_w, sh, sw, stride, pool)
    patches = as_strided(xp, shape=taps + (N,) + grid + (kh, kw, C),
                         strides=tap_strides + (sn,) + grid_strides + (sh, sw, sc), writeable=False)
    return patches, len(taps)


# Rows about this wide for per-channel maps (:func:`wide_channel_rows`). NumPy's loop over rows of a
# broadcast vector ran a third faster from 8192 values a row on (in-place add over 65536 values: 11-13 us
# for rows of 512-4096, 6.8-7.3 from 8192 on; a bias added over (65536, 32) rows, SimpleNet's conv1 output
# shape, 0.50 -> 0.40 ms).
MAP_WIDTH = 8192


def add_channel_bias(rows, bias, width=MAP_WIDTH):
    """``rows += bias`` for C-contiguous rows (M, F), in place, over :func:`wide_channel_rows`: NumPy's
    inner loop then runs over ``width`` values instead of F (SimpleNet's conv1 output, F = 32: 0.5 -> 0.23 ms
    with rows of 512)."""
    wide, r = wide_channel_rows(rows, width)
    wide += np.tile(bias, r)
    return rows


def channel_affine(x, scale, shift=None, out=None, width=MAP_WIDTH):
    """``x * scale + shift`` with one scale and shift per channel (axis 1 of x), into ``out`` (by
    default a new array in x's memory layout).

    Where x and out keep their channels in channels-last memory, over the wider rows of
    :func:`wide_channel_rows`: SimpleNet's first pool-first backward, four such maps over 0.5M values,
    2.8-3.1 -> 2.4-2.7 ms at one thread (a whole step: 94.0 -> 93.7 ms, medians of 15 alternating
    rounds). Any other layout broadcasts the vectors as usual. For many arrays with the same vectors,
    :class:`ChannelAffine` tiles them once.
    """
    return ChannelAffine(scale, shift, width)(x, out)


class ChannelAffine:
    """:func:`channel_affine` with fixed vectors, for many arrays: the tiled vectors of each row width are
    made once. On a chunk of a pool-first backward (0.26M values) the tiles and views of a fresh call took
    21 of its 56 us, 48 calls a SimpleNet step."""

    def __init__(self, scale, shift=None, width=MAP_WIDTH):
        self.scale, self.shift, self.width = scale, shift, width
        self._tiled = {}  # r -> (scale, shift) tiled r times

    def __call__(self, x, out=None):
        out = np.empty_like(x) if out is None else out
        rows, out_rows = _channel_rows(x), _channel_rows(out)
        if rows is None or out_rows is None:
            column = (-1,) + (1,) * (x.ndim - 2)
            np.multiply(x, self.scale.reshape(column), out=out)
            if self.shift is not None:
                out += self.shift.reshape(column)
            return out
        (wide, r), (out_wide, _) = wide_channel_rows(rows, self.width), wide_channel_rows(out_rows, self.width)
        if r not in self._tiled:
            self._tiled[r] = tuple(None if v is None else np.tile(v, r) for v in (self.scale, self.shift))
        scale, shift = self._tiled[r]
        np.multiply(wide, scale, out=out_wide)
        if shift is not None:
            out_wide += shift
        return out


def _channel_rows(x):
    """The (M, C) view of an (N, C, ...) array whose memory is channels-last and contiguous, else None."""
    last = x.transpose(_CHANNELS_LAST_AXES[x.ndim]) if x.ndim in _CHANNELS_LAST_AXES else np.moveaxis(x, 1, -1)
    return last.reshape(-1, x.shape[1]) if last.flags.c_contiguous else None


# axis 1 moved last, for the usual ranks (np.moveaxis takes 2-3 us a call to work it out)
_CHANNELS_LAST_AXES = {n: (0,) + tuple(range(2, n)) + (1,) for n in (2, 3, 4, 5)}


def wide_channel_rows(rows, width=MAP_WIDTH):
    """``(wide, r)``: C-contiguous rows (M, C) of per-channel values viewed as (M / r, r*C), r*C about
    ``width``, and r: ``np.tile(v, r)`` of a per-channel vector lines up with a wide row. Rows that
    are not C-contiguous come back as they are, with r = 1.

    NumPy broadcasts a (C,) vector over (M, C) rows one row of C values at a time; with C = 16
    (resnet_small) a subtraction over 50176 rows took 0.35 ms, 0.15 ms over the wide view.
    """
    if not rows.flags.c_contiguous:
        return rows, 1
    M, C = rows.shape
    r = math.gcd(M, max(1, width // C))
    return rows.reshape(M // r, r * C), r


def _output_pixels(out_h, out_w, sh, sw, stride, pool):
    """Axes of a convolution's output pixels over an input with row and column strides sh, sw:
    ((pool-window tap axes, their strides), (grid axes, their strides)). Without pooling the grid is
    (out_h, out_w) and there are no tap axes; with it, pixel (pool*ph + a, pool*pw + b) sits at tap
    (a, b) of grid cell (ph, pw)."""
    sh_out, sw_out = sh * stride, sw * stride
    if pool == 1:
        return ((), ()), ((out_h, out_w), (sh_out, sw_out))
    return (((pool, pool), (sh_out, sw_out)),
            ((out_h // pool, out_w // pool), (sh_out * pool, sw_out * pool)))


def pool_blocks(x, pool, channels_last=True):
    """The pool blocks of x (N, C, H, W), H and W multiples of ``pool``: a (pool*pool, N, C, H/pool,
    W/pool) view whose element [a*pool + b, n, c, ph, pw] is x[n, c, pool*ph + a, pool*pw + b], over
    a new array in which every tap of the pooling windows is one block: memory ordered (tap, n, ph,
    pw, c) with ``channels_last`` (the rows of a pooled :func:`im2col` convolution), else (n, c, tap,
    ph, pw) (the columns of a pooled :func:`im2col_taps` convolution)."""
    N, C, H, W = x.shape
    ph, pw = H // pool, W // pool
    windows = x.reshape(N, C, ph, pool, pw, pool)
    if channels_last:
        memory = np.ascontiguousarray(windows.transpose(3, 5, 0, 2, 4, 1)).reshape(pool * pool, N, ph, pw, C)
        return memory.transpose(0, 1, 4, 2, 3)
    memory = np.ascontiguousarray(windows.transpose(0, 1, 3, 5, 2, 4)).reshape(N, C, pool * pool, ph, pw)
    return memory.transpose(2, 0, 1, 3, 4)


def unpool_blocks(blocks, pool, channels_last=False):
    """Inverse of :func:`pool_blocks`: (pool*pool, N, C, ph, pw) -> (N, C, pool*ph, pool*pw), a new
    array, channels-last memory if asked."""
    _, N, C, ph, pw = blocks.shape
    windows = blocks.reshape(pool, pool, N, C, ph, pw)
    if channels_last:
        return channels_first(windows.transpose(2, 4, 0, 5, 1, 3).reshape(N, ph * pool, pw * pool, C))
    return windows.transpose(2, 3, 4, 0, 5, 1).reshape(N, C, ph * pool, pw * pool)


def col2im_product(d, w_taps, x_shape, kh, kw, stride=1, padding=0):
    """The input gradient of an :func:`im2col` convolution: ``col2im(d @ w_rows)``, folding the patch
    gradients back into an image and summing overlaps, one kernel tap at a time.

    Shape:
        d: (N*out_h*out_w, F), rows (n, oh, ow); w_taps: (kh*kw, F, C), tap-major (i, j)
        -> dx: x_shape = (N, C, H, W) as a view of channels-last memory.

    Per tap, one GEMM into a reused buffer and one strided slice-add: far cheaper than ``np.add.at``
    over every index, and the (N*out_h*out_w, C) buffer stays in cache where all the taps' patch
    gradients at once would not (SimpleNet's conv2: 8.0 -> 5.9 ms at 2 threads).
    """
    N, C, H, W = x_shape
    out_h = conv_output_size(H, kh, stride, padding)
    out_w = conv_output_size(W, kw, stride, padding)
    dxp = np.zeros((N, H + 2 * padding, W + 2 * padding, C), dtype=np.result_type(d, w_taps))
    buf = np.empty((len(d), C), dtype=dxp.dtype)
    for i in range(kh):
        for j in range(kw):
            np.matmul(d, w_taps[i * kw + j], out=buf)
            dxp[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride, :] += buf.reshape(N, out_h, out_w, C)
    return channels_first(dxp[:, padding:padding + H, padding:padding + W, :])


def input_grad_by_convolution(d, weight, x_shape, padding):
    """The input gradient of a stride-1 convolution (padding < kernel size) as a forward one: ``d``
    padded by k-1-padding, convolved with ``weight`` flipped and its channel axes swapped, through
    :func:`im2col_matmul` without keeping the unfold (a chunk of samples at a time, in cache).

    Shape:
        d: (N*out_h*out_w, F), rows (n, oh, ow); weight: (F, C, k, k) -> dx: x_shape = (N, C, H, W) as a
        view of channels-last memory.

    With few channels :func:`col2im_product`'s per-tap GEMMs are narrow; this is one GEMM with
    k*k*F wide rows. One thread: resnet_small's 16-channel 28x28 layers 6.0 -> 4.9 ms, its 32-channel
    14x14 one 4.0 -> 3.3 ms; SimpleNet's conv2 (64 -> 32 channels) 8.4 -> 8.2 ms.
    """
    F, C, k, _ = weight.shape
    N, _, H, W = x_shape
    out_h, out_w = conv_output_size(H, k, 1, padding), conv_output_size(W, k, 1, padding)
    image = channels_first(d.reshape(N, out_h, out_w, F))
    w_rows = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 2, 3, 0)).reshape(C, -1)  # (C, (i, j, f))
    _, dx = im2col_matmul(image, w_rows, k, k, 1, k - 1 - padding, keep_col=False)
    return channels_first(dx.reshape(N, H, W, C))


def im2col_batch_last(x, kh, kw, stride=1, padding=0, pool=1):
    """Unfold image patches into columns with the batch fastest, the layout for few input channels.

    Shape:
        x: (N, C, H, W) (any memory layout) -> col: (kh*kw*C, out_h*out_w*N), rows ordered (i, j, c)
        like :func:`im2col`'s columns, columns (oh, ow, n); ``w_rows @ col`` is the convolution.
        With ``pool`` > 1 the columns are ordered (a, b, ph, pw, n) for output pixel
        (pool*ph + a, pool*pw + b): the pool-window taps first, as in :func:`im2col`'s rows.

    One copy of x into padded (C, H, W, N) memory, then one strided copy whose runs are out_w*N
    values long (N with pooling) where :func:`im2col` copies runs of kw*C values.
    """
    patches = _batch_last_patches(x, kh, kw, stride, padding, pool)
    return np.ascontiguousarray(patches).reshape(kh * kw * x.shape[1], -1)


def batch_last_matmul(x, w_rows, kh, kw, stride=1, padding=0, pool=1, chunk_bytes=CHUNK_BYTES, whole_bytes=None):
    """``w_rows @ im2col_batch_last(x, ...)`` (same arguments) for a pass that keeps no unfold (an
    evaluation pass): an unfold larger than ``whole_bytes`` (default :data:`WHOLE_BATCH_LAST`) is
    built a few output rows at a time into one reused buffer of about ``chunk_bytes``, each chunk
    multiplied while in cache, as :func:`im2col_matmul` does without keeping col.

    Shape:
        w_rows: (F, kh*kw*C) -> (F, out_h*out_w*N), columns ordered as :func:`im2col_batch_last`'s.

    Whole eval passes at one thread, whole unfolds against chunks in 10 alternating rounds in one
    process: at the trainer's eval_batch_size of 128 (LeNet-5's conv1 unfold 10 MB, SimpleConvNet's
    7.4 MB) LeNet-5 (ReLU, max-pool) 4.01 -> 3.15 ms, the classic one 4.92 -> 4.26 ms, SimpleConvNet
    5.49 -> 4.55 ms (batch 256: 10.2 -> 8.9 ms); at batch 64 (unfolds of 5 MB and less) the chunks
    lost 5-15%, so those stay whole.
    """
    patches = _batch_last_patches(x, kh, kw, stride, padding, pool)
    K, F = kh * kw * x.shape[1], w_rows.shape[0]
    if patches.size * patches.itemsize <= (WHOLE_BATCH_LAST if whole_bytes is None else whole_bytes):
        return matmul_pieces(w_rows, np.ascontiguousarray(patches).reshape(K, -1))
    lead = patches.ndim - 3  # taps..., grid rows, grid columns, N: the chunks go along the grid rows
    rows, row_columns = patches.shape[lead], int(np.prod(patches.shape[lead + 1:], dtype=int))
    step = max(1, chunk_bytes // (K * row_columns * patches.itemsize))
    buffer = np.empty((K, min(step, rows) * row_columns), dtype=patches.dtype)
    out = np.empty((F, patches[0, 0, 0].size), dtype=np.result_type(x, w_rows))
    start = 0
    for tap in np.ndindex(patches.shape[3:lead]):
        for r in range(0, rows, step):
            chunk = patches[(slice(None),) * 3 + tap + (slice(r, r + step),)]
            width = chunk[0, 0, 0].size
            np.copyto(buffer[:, :width].reshape(chunk.shape), chunk)
            matmul_pieces(w_rows, buffer[:, :width], out=out[:, start:start + width])
            start += width
    return out


def _batch_last_patches(x, kh, kw, stride, padding, pool):
    """The read-only strided view of x's patches that :func:`im2col_batch_last` copies, shaped
    (kh, kw, C, taps..., grid..., N), over one copy of x into padded (C, H, W, N) memory."""
    N, C, H, W = x.shape
    out_h = conv_output_size(H, kh, stride, padding)
    out_w = conv_output_size(W, kw, stride, padding)
    xb = np.zeros((C, H + 2 * padding, W + 2 * padding, N), dtype=x.dtype)
    xb[:, padding:padding + H, padding:padding + W] = x.transpose(1, 2, 3, 0)
    sc, sh, sw, sn = xb.strides
    (taps, tap_strides), (grid, grid_strides) = _output_pixels(out_h, out_w, sh, sw, stride, pool)
    return as_strided(xb, shape=(kh, kw, C) + taps + grid + (N,),
                      strides=(sh, sw, sc) + tap_strides + grid_strides + (sn,), writeable=False)


def batch_last(d, pool=1):
    """The (F, out_h*out_w*N) copy of a convolution's output gradient that :func:`col2im_batch_last`
    takes, columns ordered (oh, ow, n): the batch fastest.

    Shape:
        d: (N, F, out_h, out_w), or with ``pool`` > 1 its (pool*pool, N, F, out_h/pool, out_w/pool)
        :func:`pool_blocks` (any memory layout).
    """
    if pool > 1:
        _, N, F, ph, pw = d.shape
        d = d.reshape(pool, pool, N, F, ph, pw).transpose(3, 4, 0, 5, 1, 2)  # (F, ph, a, pw, b, n)
    else:
        d = d.transpose(1, 2, 3, 0)
    return np.ascontiguousarray(d).reshape(d.shape[0], -1)


def col2im_batch_last(d, w_rows, x_shape, kh, kw, stride=1, padding=0):
    """The input gradient of an :func:`im2col` convolution with few input channels: one GEMM for the
    patch gradients of every kernel tap, then the fold, one kernel row and then one kernel column
    at a time, over the batch-last layout in which every slice-add runs over long contiguous runs.

    Shape:
        d: (F, out_h*out_w*N) from :func:`batch_last`; w_rows: (F, kh*kw*C), columns (i, j, c)
        -> dx: x_shape = (N, C, H, W), a view of batch-last (C, H, W, N) memory.

    :func:`col2im_product` multiplies by one (F, C) tap of the weights at a time, a GEMM with only C
    output columns, and adds runs of out_w*C values. LeNet-5's conv2 (C = 6, 5x5): 1.45-1.49 ms that
    way, 0.73-0.78 ms this way at one thread; with C = 12, 2.0 against 1.5 ms. With 3x3 kernels it
    is the slower one (C = 8 on 28x28: 3.4-3.5 ms that way against 5.0-5.3; C = 16 on 14x14: 2.3
    against 2.6-2.9), hence :class:`numexp.nn.Conv2d`'s choice (5x5 or more, under 16 channels).
    """
    N, C, H, W = x_shape
    out_h = conv_output_size(H, kh, stride, padding)
    out_w = conv_output_size(W, kw, stride, padding)
    Hp, Wp = H + 2 * padding, W + 2 * padding
    dcol = matmul_pieces(w_rows.T, d).reshape(kh, kw, C, out_h, out_w, N)
    rows = np.zeros((kw, C, Hp, out_w, N), dtype=dcol.dtype)  # folded along the height only
    for i in range(kh):
        rows[:, :, i:i + stride * out_h:stride] += dcol[i]
    dxp = np.zeros((C, Hp, Wp, N), dtype=dcol.dtype)
    for j in range(kw):
        dxp[:, :, j:j + stride * out_w:stride] += rows[j]
    return dxp[:, padding:padding + H, padding:padding + W].transpose(3, 0, 1, 2)


def im2col_taps(x, kh, kw, stride=1, padding=0, pool=1):
    """Unfold image patches sample by sample, the layout for few input channels (LeNet's conv1).

    Shape:
        x: (N, C, H, W) -> col: (N, C*kh*kw, out_h*out_w), rows ordered (c, i, j) like a torch-layout
        weight reshaped to (F, C*kh*kw); ``np.matmul(w.reshape(F, -1), col)`` is the convolution as
        (N, F, out_h*out_w), plain NCHW memory.

    With one input channel the row layout of :func:`im2col` copies one float at a time; here every
    copied run is a whole output row (out_w floats). Per sample, the GEMMs stay in cache: with the
    whole batch as one (C*kh*kw, N*out_h*out_w) operand, OpenBLAS ran LeNet's conv1 2x slower and
    its weight gradient 6x slower.

    With ``pool`` > 1 the columns are ordered (a, b, ph, pw) for output pixel (pool*ph + a,
    pool*pw + b): the convolution's output then comes in :func:`pool_blocks` (not channels-last).
    """
    N, C, H, W = x.shape
    out_h = conv_output_size(H, kh, stride, padding)
    out_w = conv_output_size(W, kw, stride, padding)
    xp = pad2d(x, padding)
    sn, sc, sh, sw = xp.strides
    (taps, tap_strides), (grid, grid_strides) = _output_pixels(out_h, out_w, sh, sw, stride, pool)
    patches = as_strided(xp, shape=(N, C, kh, kw) + taps + grid,
                         strides=(sn, sc, sh, sw) + tap_strides + grid_strides, writeable=False)
    return patches.reshape(N, C * kh * kw, out_h * out_w)


def col2im_taps(col, x_shape, kh, kw, stride=1, padding=0, pool=1):
    """Adjoint of :func:`im2col_taps` (with the same ``pool``): fold (N, C*kh*kw, out_h*out_w) columns
    back into (N, C, H, W), one strided slice-add per kernel tap (and pooling-window tap)."""
    N, C, H, W = x_shape
    out_h = conv_output_size(H, kh, stride, padding) // pool
    out_w = conv_output_size(W, kw, stride, padding) // pool
    taps = col.reshape(N, C, kh, kw, pool, pool, out_h, out_w)
    dxp = np.zeros((N, C, H + 2 * padding, W + 2 * padding), dtype=col.dtype)
    step = stride * pool
    for i in range(kh):
        for j in range(kw):
            for a in range(pool):
                for b in range(pool):
                    top, left = i + stride * a, j + stride * b
                    dxp[:, :, top:top + step * out_h:step, left:left + step * out_w:step] += taps[:, :, i, j, a, b]
    return dxp[:, :, padding:padding + H, padding:padding + W]


def window_taps(x, kh, kw, stride, out_h, out_w):
    """Yield ((i, j), view) for every tap of a (kh, kw) window sliding with ``stride``.

    Each view has shape (N, C, out_h, out_w): element [n, c, a, b] is
    x[n, c, a*stride + i, b*stride + j]. Views, not copies.
    """
    for i in range(kh):
        for j in range(kw):
            yield (i, j), x[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]


def first_maxima(taps, out):
    """For each window tap's values ``taps[t]`` (views shaped like the window maxima ``out``), yield
    the boolean mask of the windows whose first maximum, in tap order, is that tap (torch's tie rule).

    The yielded mask is reused: use it before asking for the next.
    """
    taken, winner = np.empty_like(out, dtype=bool), np.empty_like(out, dtype=bool)
    last = len(taps) - 1
    for t, view in enumerate(taps):
        np.equal(view, out, out=winner)
        if t == 0:
            taken, winner = winner, taken
            yield taken
        else:
            np.greater(winner, taken, out=winner)  # winner and not taken: the first maximum wins
            if t < last:
                taken |= winner
            yield winner


def tap_slice(i, j, stride, out_h, out_w):
    """The index of one window tap, for writing into an (N, C, H, W) gradient."""
    return (slice(None), slice(None),
            slice(i, i + stride * out_h, stride), slice(j, j + stride * out_w, stride))


def conv2d_naive(x, weight, bias, stride=1, padding=0):
    """Reference convolution with explicit loops over output pixels (tests only).

    Shape:
        x: (N, C, H, W), weight: (F, C, kh, kw), bias: (F,) or None -> out: (N, F, out_h, out_w)
    """
    N, C, H, W = x.shape
    F, _, kh, kw = weight.shape
    out_h = conv_output_size(H, kh, stride, padding)
    out_w = conv_output_size(W, kw, stride, padding)
    xp = pad2d(x, padding)
    out = np.zeros((N, F, out_h, out_w), dtype=x.dtype)
    for a in range(out_h):
        for b in range(out_w):
            window = xp[:, :, a * stride:a * stride + kh, b * stride:b * stride + kw]
            out[:, :, a, b] = np.tensordot(window, weight, axes=([1, 2, 3], [1, 2, 3]))
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def conv2d_naive_backward(dout, x, weight, stride=1, padding=0):
    """Gradients of :func:`conv2d_naive` with the same loops (tests only).

    Returns (dx, dweight, dbias) with the shapes of x, weight and (F,).
    """
    F, _, kh, kw = weight.shape
    _, _, out_h, out_w = dout.shape
    xp = pad2d(x, padding)
    dxp = np.zeros_like(xp)
    dweight = np.zeros_like(weight)
    for a in range(out_h):
        for b in range(out_w):
            rows = slice(a * stride, a * stride + kh)
            cols = slice(b * stride, b * stride + kw)
            g = dout[:, :, a, b]  # (N, F)
            dweight += np.tensordot(g, xp[:, :, rows, cols], axes=([0], [0]))
            dxp[:, :, rows, cols] += np.tensordot(g, weight, axes=([1], [0]))
    dx = dxp if padding == 0 else dxp[:, :, padding:-padding, padding:-padding]
    return dx, dweight, dout.sum(axis=(0, 2, 3))
