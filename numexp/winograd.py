"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions for :class:`numexp.nn.Conv2d`: 3x3 kernels, stride 1,
padding 1.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016), https://arxiv.org/abs/1509.09308.
A 3x3 convolution's output, cut into m x m tiles: each tile is ``A^T [(G g G^T) * (B^T d B)] A`` summed
over the input channels, for the n x n input tile d under it (n = m + 2; tiles overlap, stride m) and the
kernel g. At each of the n*n positions of a transformed tile the sum over channels is one GEMM, (tiles, C) @
(C, F): for m = 2, 16 multiplies per 4 outputs and channel pair where im2col's GEMM makes 36, 2.25x fewer; for
m = 4, 36 per 16, 4x fewer. The transforms are sums and differences, done here as small products (B^T over the
input tiles' rows then their columns, the Kronecker matrices of :class:`Tiling` for kernels and output tiles)
over one sample at a time, so that everything stays in cache; the GEMMs of one sample (for SimpleNet's conv2,
64 x 32 by 32 x 64 with 2x2 tiles, 16 x 32 by 32 x 64 with 4x4 ones) are small enough for OpenBLAS's
small-matrix kernels, about 155 GFLOP/s on the Xeon.

SimpleNet's conv2 (32 -> 64 channels at 16x16, batch 64) at one thread on a Xeon: forward 6.0 -> 3.8 ms,
forward and backward 20.2 -> 14.4 ms against im2col with 2x2 tiles; with 4x4 tiles the training step is 2.9 ms
shorter again (see ``numexp.nn.WINOGRAD_TILE``, and ``numexp.nn.WINOGRAD_CHANNELS`` for where Winograd loses).
F(4x4, 3x3)'s transforms hold fractions (1/6, 1/24) and values up to 8: in float32 its error is about 5e-6 of
the output's scale, against 3e-7 for F(2x2, 3x3); in float64, 1e-14.

The 2x2 output tiles are exactly the windows of a 2x2 max-pool, and a 4x4 tile holds four of them: the forward
pass writes the convolution's output as :func:`numexp.kernels.pool_blocks` memory (2x2 tiles with no extra
copy, 4x4 ones through a copy in cache, :func:`block_tiles`), and the backward pass reads the gradient of those
blocks as tiles.

Arrays of tiles are shaped (m, m, N, H/m, W/m, channels): element [a, b, n, ty, tx] is pixel
(m*ty + a, m*tx + b) of image n; for m = 2, the layout of pool blocks (tap a*2 + b).
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import kernels

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
# F(4x4, 3x3), Lavin & Gray's matrices (interpolation points 0, 1, -1, 2, -2 and infinity)
B_T4 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                 [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64)
A_T4 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=np.float64)


class Tiling:
    """F(m x m, 3 x 3): m x m output tiles from the n x n input tiles under them (n = m + 2, stride m).

    Attributes: m, n; b_t (n, n); weight = kron(G, G) (n*n, 9): vec(G g G^T) of a kernel flattened row by
    row; output = kron(A^T, A^T) (m*m, n*n): vec(A^T t A), its transpose maps an output tile's gradient back.
    """

    def __init__(self, b_t, g, a_t):
        self.m, self.n = a_t.shape
        self.b_t, self.weight, self.output = b_t, np.kron(g, g), np.kron(a_t, a_t)


F2 = Tiling(B_T, G, A_T)
F4 = Tiling(B_T4, G4, A_T4)

# The transformed input and products of a chunk of samples stay in cache. SimpleNet's conv2 at one thread
# (one sample a chunk, against two): forward 3.7-3.8 against 3.9-4.3 ms, weight gradient 4.8 against
# 5.6, input gradient 5.0 against 5.7; in a first version, 2 samples 4.7 ms, 4: 6.3, 8: 7.3, 16: 7.5. With
# 4x4 tiles one sample's arrays take 221 kB: 256 kB keeps them at one sample a chunk (the step 0.54 ms shorter
# than at two, 30 alternating pairs; resnet_small's the same).
CHUNK_BYTES = 1 << 18


def applies(x_shape, kernel_size, stride, padding):
    """Whether a convolution with these settings of an input of ``x_shape`` can run here."""
    _, _, H, W = x_shape
    return kernel_size == 3 and stride == 1 and padding == 1 and H % 2 == 0 and W % 2 == 0


def tiling_for(x_shape):
    """:data:`F4` where the image cuts into 4x4 tiles (and the tiles into 2x2 pool windows), else :data:`F2`."""
    _, _, H, W = x_shape
    return F4 if H % 4 == 0 and W % 4 == 0 else F2


def transform_weights(w, tiling=F2):
    """``G g G^T`` of every kernel: w (F, C, 3, 3) -> (n*n, C, F), position-major."""
    F, C = w.shape[:2]
    taps = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(9, C * F)  # (3*3, C*F)
    # SimpleNet's conv2: einsum 0.30, this 0.03 ms
    return (tiling.weight.astype(w.dtype) @ taps).reshape(tiling.n ** 2, C, F)


def conv(x, u, layout="blocks", keep=False, tiling=F2):
    """The convolution (padding 1) of x (N, C, H, W), any memory layout, with transformed weights u
    (n*n, C, F): as 2x2 pool blocks (2, 2, N, H/2, W/2, F) in their own C-contiguous memory (``"blocks"``), or as
    an (N, H, W, F) channels-last image (``"image"``); and, with ``keep``, the transformed input tiles
    (n*n, N*H/m*W/m, C) for :func:`weight_grad`, else None."""
    N, C, H, W = x.shape
    m = tiling.m
    xp = kernels.pad_nhwc(kernels.channels_last(x), 1)
    dtype = np.result_type(x, u)
    v = np.empty((tiling.n ** 2, N * (H // m) * (W // m), C), dtype=dtype) if keep else None
    return _convolve(_tiles(xp, tiling), u, _output(N, H, W, u.shape[2], dtype, layout, m), tiling, v), v


def padded_gradient(dy):
    """The output gradient as a channels-last image padded by 1, (N, H+2, W+2, F), from its 2x2 tiles dy
    (2, 2, N, H/2, W/2, F): the input of :func:`input_grad`'s convolution."""
    _, _, N, th, tw, F = dy.shape
    dp = np.empty((N, 2 * th + 2, 2 * tw + 2, F), dtype=dy.dtype)
    for border in (dp[:, 0], dp[:, -1], dp[:, :, 0], dp[:, :, -1]):
        border[...] = 0
    np.copyto(image_tiles(dp[:, 1:-1, 1:-1]), dy)
    return dp


def input_grad(dy, w, tiling=F2, padded=None):
    """The input gradient, (N, H, W, C) channels-last, of :func:`conv` with weights w (F, C, 3, 3), from the
    output gradient's 2x2 tiles dy (2, 2, N, H/2, W/2, F) or its :func:`padded_gradient` ``padded``: the
    convolution of dy (padding 1) with w flipped and its channel axes swapped."""
    dp = padded_gradient(dy) if padded is None else padded
    N, H, W = dp.shape[0], dp.shape[1] - 2, dp.shape[2] - 2
    u = transform_weights(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), tiling)
    return _convolve(_tiles(dp, tiling), u, _output(N, H, W, w.shape[1], u.dtype, "image", tiling.m), tiling)


def weight_grad(x, dy, v=None, tiling=F2):
    """The weight gradient (F, C, 3, 3) of :func:`conv` of x (N, C, H, W) from the output gradient's m x m
    tiles dy (m, m, N, H/m, W/m, F): ``G^T [sum over tiles of (B^T d B) * (A dy A^T)] G`` per channel pair.
    v: the transformed input tiles that :func:`conv` kept, or None to transform x again."""
    N, C, H, W = x.shape
    m, n2 = tiling.m, tiling.n ** 2
    F, per_sample = dy.shape[-1], (H // m) * (W // m)
    tiles = _tiles(kernels.pad_nhwc(kernels.channels_last(x), 1), tiling) if v is None else None
    dtype = np.result_type(x, dy)
    out_t = np.ascontiguousarray(tiling.output.T.astype(dtype))
    # pool blocks' memory is read in place, a sample at a time (SimpleNet's conv2: 4.3-4.5 -> 3.8-3.9 ms with
    # the tiles it kept); an image's tiles go through a copy in cache
    blocks = dy.reshape(m * m, N, -1) if dy.flags.c_contiguous else None
    du, part = np.zeros((n2, C, F), dtype=dtype), np.empty((n2, C, F), dtype=dtype)
    for n, chunk in _chunks(tiling, (N, H // m, W // m, C), F, dtype, out_tiles=blocks is None,
                            transforms=v is None):
        s = chunk.samples
        if v is None:
            v_t = chunk.transform_input(tiles[:, :, n:n + s]).transpose(0, 2, 1)
        else:
            v_t = _kept(v, n, s, per_sample, tiling.n)[0].transpose(0, 2, 1)
        if blocks is None:
            np.copyto(chunk.out_tiles, dy[:, :, n:n + s])
        rows = chunk.out_rows if blocks is None else blocks[:, n:n + s].reshape(m * m, -1)
        np.matmul(out_t, rows, out=chunk.m_rows)  # A dy A^T of every tile
        du += np.matmul(v_t, chunk.m, out=part)
    taps = tiling.weight.T.astype(dtype) @ du.reshape(n2, C * F)  # vec(G^T t G) = kron(G, G)^T vec(t)
    return np.ascontiguousarray(taps.reshape(3, 3, C, F).transpose(3, 2, 0, 1))


def _tiles(xp, tiling=F2):
    """The n x n tiles at stride m of a padded channels-last image xp (N, H+2, W+2, C): a read-only
    (n, n, N, H/m, W/m, C) view, element [i, j, n, ty, tx] = xp[n, m*ty + i, m*tx + j]."""
    N, Hp, Wp, C = xp.shape
    sn, sh, sw, sc = xp.strides
    m = tiling.m
    return as_strided(xp, shape=(tiling.n, tiling.n, N, (Hp - 2) // m, (Wp - 2) // m, C),
                      strides=(sh, sw, sn, m * sh, m * sw, sc), writeable=False)


def image_tiles(image, m=2):
    """The (m, m, N, H/m, W/m, C) tiles of an (N, H, W, C) image: a view where its memory allows."""
    N, H, W, C = image.shape
    return image.reshape(N, H // m, m, W // m, m, C).transpose(2, 4, 0, 1, 3, 5)


def block_tiles(blocks, m):
    """The m x m output tiles of 2x2 pool blocks (2, 2, N, H/2, W/2, F): for m = 2 the blocks themselves; for
    m = 4 a view (2, 2, 2, 2, N, H/4, W/4, F) whose first four axes are a tile's row and column, each split
    into (window, tap in the window), element [i1, a, j1, b, n, ty, tx] = pixel (4*ty + 2*i1 + a, 4*tx + 2*j1
    + b), tile position (2*i1 + a, 2*j1 + b)."""
    if m == 2:
        return blocks
    _, _, N, ph, pw, F = blocks.shape
    return blocks.reshape(2, 2, N, ph // 2, 2, pw // 2, 2, F).transpose(4, 0, 6, 1, 2, 3, 5, 7)


def _output(N, H, W, F, dtype, layout, m=2):
    """(array returned, tiles view written): the output of a convolution in ``layout``."""
    if layout == "blocks":
        out = np.empty((2, 2, N, H // 2, W // 2, F), dtype=dtype)
        return out, block_tiles(out, m)
    image = np.empty((N, H, W, F), dtype=dtype)
    return image, image_tiles(image, m)


def _kept(v, n, samples, per_sample, side):
    """(part, its (side, side, tiles * C) view) of the transformed tiles v (side*side, N*per_sample, C) of
    ``samples`` samples from sample n."""
    part = v[:, n * per_sample:(n + samples) * per_sample]
    return part, part.reshape(side, side, -1)


class _Chunk:
    """The arrays that the transforms and products of ``samples`` samples' tiles reuse, and the views
    they are written through, made once: a sample's work takes tens of microseconds, a view one.

    Shapes, for T = samples * th * tw tiles of n x n (m x m out): tiles (n, n, samples, th, tw, C); v, their
    ``B^T d B``, (n*n, T, C); m, products (n*n, T, F); out_tiles, tiles of an output or its gradient (m, m,
    samples, th, tw, F), when asked.
    """

    def __init__(self, tiling, samples, grid, C, F, dtype, out_tiles=False, transforms=True):
        th, tw = grid
        T = samples * th * tw
        n, m = tiling.n, tiling.m
        self.samples = samples
        if transforms:  # for transform_input
            self.tiles = np.empty((n, n, samples, th, tw, C), dtype=dtype)
            self.tile_rows = self.tiles.reshape(n, -1)
            self.half = np.empty((n, n, T * C), dtype=dtype)  # B^T over the tiles' rows
            self.half_rows = self.half.reshape(n, -1)
            self.v = np.empty((n * n, T, C), dtype=dtype)
            self.v_cols = self.v.reshape(n, n, T * C)
        self.m = np.empty((n * n, T, F), dtype=dtype)
        self.m_rows = self.m.reshape(n * n, -1)
        self.out_tiles = np.empty((m, m, samples, th, tw, F), dtype=dtype) if out_tiles else None
        self.out_rows = self.out_tiles.reshape(m * m, -1) if out_tiles else None
        self._b_t = tiling.b_t.astype(dtype)

    def transform_input(self, tiles, into=None):
        """v = ``B^T d B`` of every tile d in ``tiles`` (this chunk's samples), as two products with B^T:
        over the tiles' rows, then their columns. One product with kron(B^T, B^T) (16 x 16) made twice the
        multiply-adds: for 64 channels of 64 tiles 33 against 18 us, for 32 channels the same 11 us.
        ``into``: (v, its (n, n, T*C) view) to write instead of this chunk's own v."""
        v, v_cols = into or (self.v, self.v_cols)
        np.copyto(self.tiles, tiles)
        np.matmul(self._b_t, self.tile_rows, out=self.half_rows)
        np.matmul(self._b_t, self.half, out=v_cols)
        return v


def _chunks(tiling, grid_shape, F, dtype, out_tiles=False, transforms=True):
    """(first sample, :class:`_Chunk`) for every chunk of the samples of a tile grid (N, th, tw, C): about
    CHUNK_BYTES of transformed input and products each, the last one shorter where N does not divide."""
    N, th, tw, C = grid_shape
    step = max(1, min(N, CHUNK_BYTES // (tiling.n ** 2 * th * tw * (C + F) * np.dtype(dtype).itemsize)))
    chunk = _Chunk(tiling, step, (th, tw), C, F, dtype, out_tiles, transforms)
    for n in range(0, N - N % step, step):
        yield n, chunk
    if N % step:
        yield N - N % step, _Chunk(tiling, N % step, (th, tw), C, F, dtype, out_tiles, transforms)


def _convolve(tiles, u, output, tiling=F2, keep=None):
    """Fill ``output`` = (result, its tiles view: (m, m, N, th, tw, F), or :func:`block_tiles`' view) with the
    convolution of the input ``tiles`` (n, n, N, th, tw, C) with transformed weights u (n*n, C, F); returns the
    result. ``keep``: an array (n*n, N*th*tw, C) to hold the transformed input tiles of the whole batch."""
    result, dest = output
    N, F, m = tiles.shape[2], u.shape[2], tiling.m
    per_sample = tiles.shape[3] * tiles.shape[4]
    a_t = tiling.output.astype(u.dtype)
    # tiles memory (pool blocks) takes the products straight in; other views through a copy
    dest_rows = dest.reshape(m * m, N, -1) if dest.flags.c_contiguous else None
    for n, chunk in _chunks(tiling, tiles.shape[2:], F, u.dtype, out_tiles=dest_rows is None):
        s = chunk.samples
        into = None if keep is None else _kept(keep, n, s, per_sample, tiling.n)
        np.matmul(chunk.transform_input(tiles[:, :, n:n + s], into), u, out=chunk.m)
        if dest_rows is not None:
            np.matmul(a_t, chunk.m_rows, out=dest_rows[:, n:n + s].reshape(m * m, -1))
        else:
            np.matmul(a_t, chunk.m_rows, out=chunk.out_rows)
            part = dest[..., n:n + s, :, :, :]  # the sample axis is the fourth from the end in either view
            np.copyto(part, chunk.out_tiles.reshape(part.shape))
    return result
