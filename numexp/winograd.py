"""Winograd F(2x2, 3x3) convolution for :class:`numexp.nn.Conv2d`: 3x3 kernels, stride 1, padding 1.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016), https://arxiv.org/abs/1509.09308.
A 3x3 convolution's output, cut into 2x2 tiles: each tile is ``A^T [(G g G^T) * (B^T d B)] A`` summed
over the input channels, for the 4x4 input tile d under it (tiles overlap, stride 2) and the kernel g.
At each of the 16 positions of a transformed tile the sum over channels is one GEMM, (tiles, C) @ (C, F):
16 multiplies per tile and channel pair where im2col's GEMM makes 36, 2.25x fewer. The transforms are
sums and differences, done here as small products (B^T over the input tiles' rows then their columns,
the Kronecker matrices :data:`WEIGHT` and :data:`OUTPUT` for kernels and output tiles) over one sample
at a time, so that everything stays in cache; the 16 GEMMs of one sample (64 x 32 by 32 x 64 for
SimpleNet's conv2) are small enough for OpenBLAS's small-matrix kernels, about 155 GFLOP/s on the Xeon.

SimpleNet's conv2 (32 -> 64 channels at 16x16, batch 64) at one thread on a Xeon: forward 6.0 -> 3.8 ms,
forward and backward 20.2 -> 14.4 ms against im2col; see ``numexp.nn.WINOGRAD_CHANNELS`` for where it loses.

The 2x2 output tiles are exactly the windows of a 2x2 max-pool: the forward pass writes the
convolution's output as :func:`numexp.kernels.pool_blocks` memory with no extra copy, and the backward
pass reads the gradient of those blocks as tiles.

Arrays of tiles are shaped (2, 2, N, H/2, W/2, channels): element [a, b, n, ty, tx] is pixel
(2*ty + a, 2*tx + b) of image n, the layout of pool blocks (tap a*2 + b).
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import kernels

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
# vec(P t P^T) = kron(P, P) @ vec(t) for a tile t flattened row by row
WEIGHT = np.kron(G, G)  # (16, 9): vec(G g G^T)
OUTPUT = np.kron(A_T, A_T)  # (4, 16): vec(A^T m A); its transpose maps an output tile's gradient back

# The transformed input and products of a chunk of samples stay in cache. SimpleNet's conv2 at one thread
# (one sample a chunk, against two): forward 3.7-3.8 against 3.9-4.3 ms, weight gradient 4.8 against
# 5.6, input gradient 5.0 against 5.7; in a first version, 2 samples 4.7 ms, 4: 6.3, 8: 7.3, 16: 7.5.
CHUNK_BYTES = 1 << 19


def applies(x_shape, kernel_size, stride, padding):
    """Whether a convolution with these settings of an input of ``x_shape`` can run here."""
    _, _, H, W = x_shape
    return kernel_size == 3 and stride == 1 and padding == 1 and H % 2 == 0 and W % 2 == 0


def transform_weights(w):
    """``G g G^T`` of every kernel: w (F, C, 3, 3) -> (16, C, F), position-major."""
    F, C = w.shape[:2]
    taps = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(9, C * F)  # (3*3, C*F)
    return (WEIGHT.astype(w.dtype) @ taps).reshape(16, C, F)  # SimpleNet's conv2: einsum 0.30, this 0.03 ms


def conv(x, u, layout="blocks", keep=False):
    """The convolution (padding 1) of x (N, C, H, W), any memory layout, with transformed weights u
    (16, C, F): as tiles (2, 2, N, H/2, W/2, F) in their own C-contiguous memory (``"blocks"``), or as an
    (N, H, W, F) channels-last image (``"image"``); and, with ``keep``, the transformed input tiles
    (16, N*H/2*W/2, C) for :func:`weight_grad`, else None."""
    N, C, H, W = x.shape
    xp = kernels.pad_nhwc(kernels.channels_last(x), 1)
    dtype = np.result_type(x, u)
    v = np.empty((16, N * (H // 2) * (W // 2), C), dtype=dtype) if keep else None
    return _convolve(_tiles(xp), u, _output(N, H, W, u.shape[2], dtype, layout), v), v


def input_grad(dy, w):
    """The input gradient, (N, H, W, C) channels-last, of :func:`conv` with weights w (F, C, 3, 3), from the
    output gradient's tiles dy (2, 2, N, H/2, W/2, F): the convolution of dy (padding 1) with w flipped
    and its channel axes swapped."""
    _, _, N, th, tw, F = dy.shape
    dp = np.empty((N, 2 * th + 2, 2 * tw + 2, F), dtype=dy.dtype)
    for border in (dp[:, 0], dp[:, -1], dp[:, :, 0], dp[:, :, -1]):
        border[...] = 0
    np.copyto(image_tiles(dp[:, 1:-1, 1:-1]), dy)
    u = transform_weights(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    return _convolve(_tiles(dp), u, _output(N, 2 * th, 2 * tw, w.shape[1], u.dtype, "image"))


def weight_grad(x, dy, v=None):
    """The weight gradient (F, C, 3, 3) of :func:`conv` of x (N, C, H, W) from the output gradient's tiles
    dy (2, 2, N, H/2, W/2, F): ``G^T [sum over tiles of (B^T d B) * (A dy A^T)] G`` per channel pair.
    v: the transformed input tiles that :func:`conv` kept, or None to transform x again."""
    N, C, H, W = x.shape
    F, per_sample = dy.shape[-1], (H // 2) * (W // 2)
    tiles = _tiles(kernels.pad_nhwc(kernels.channels_last(x), 1)) if v is None else None
    dtype = np.result_type(x, dy)
    out_t = np.ascontiguousarray(OUTPUT.T.astype(dtype))
    # pool blocks' memory is read in place, a sample at a time (SimpleNet's conv2: 4.3-4.5 -> 3.8-3.9 ms with
    # the tiles it kept); an image's tiles go through a copy in cache
    blocks = dy.reshape(4, N, -1) if dy.flags.c_contiguous else None
    du, part = np.zeros((16, C, F), dtype=dtype), np.empty((16, C, F), dtype=dtype)
    for n, chunk in _chunks((4, 4, N, H // 2, W // 2, C), F, dtype, out_tiles=blocks is None, transforms=v is None):
        s = chunk.samples
        if v is None:
            v_t = chunk.transform_input(tiles[:, :, n:n + s]).transpose(0, 2, 1)
        else:
            v_t = _kept(v, n, s, per_sample)[0].transpose(0, 2, 1)
        if blocks is None:
            np.copyto(chunk.out_tiles, dy[:, :, n:n + s])
        rows = chunk.out_rows if blocks is None else blocks[:, n:n + s].reshape(4, -1)
        np.matmul(out_t, rows, out=chunk.m_rows)  # A dy A^T of every tile
        du += np.matmul(v_t, chunk.m, out=part)
    taps = WEIGHT.T.astype(dtype) @ du.reshape(16, C * F)  # vec(G^T m G) = kron(G, G)^T vec(m)
    return np.ascontiguousarray(taps.reshape(3, 3, C, F).transpose(3, 2, 0, 1))


def _tiles(xp):
    """The 4x4 tiles at stride 2 of a padded channels-last image xp (N, H+2, W+2, C): a read-only
    (4, 4, N, H/2, W/2, C) view, element [i, j, n, ty, tx] = xp[n, 2*ty + i, 2*tx + j]."""
    N, Hp, Wp, C = xp.shape
    sn, sh, sw, sc = xp.strides
    return as_strided(xp, shape=(4, 4, N, (Hp - 2) // 2, (Wp - 2) // 2, C),
                      strides=(sh, sw, sn, 2 * sh, 2 * sw, sc), writeable=False)


def image_tiles(image):
    """The (2, 2, N, H/2, W/2, C) tiles of an (N, H, W, C) image: a view where its memory allows."""
    N, H, W, C = image.shape
    return image.reshape(N, H // 2, 2, W // 2, 2, C).transpose(2, 4, 0, 1, 3, 5)


def _output(N, H, W, F, dtype, layout):
    """(array returned, tiles view written): the output of a convolution in ``layout``."""
    if layout == "blocks":
        out = np.empty((2, 2, N, H // 2, W // 2, F), dtype=dtype)
        return out, out
    image = np.empty((N, H, W, F), dtype=dtype)
    return image, image_tiles(image)


def _kept(v, n, samples, per_sample):
    """(part, its (4, 4, tiles * C) view) of the transformed tiles v (16, N*per_sample, C) of ``samples``
    samples from sample n."""
    part = v[:, n * per_sample:(n + samples) * per_sample]
    return part, part.reshape(4, 4, -1)


class _Chunk:
    """The arrays that the transforms and products of ``samples`` samples' tiles reuse, and the views
    they are written through, made once: a sample's work takes tens of microseconds, a view one.

    Shapes, for T = samples * th * tw tiles: tiles (4, 4, samples, th, tw, C); v, their ``B^T d B``,
    (16, T, C); m, products (16, T, F); out_tiles, tiles of an output or its gradient (2, 2, samples, th,
    tw, F), when asked.
    """

    def __init__(self, samples, grid, C, F, dtype, out_tiles=False, transforms=True):
        th, tw = grid
        T = samples * th * tw
        self.samples = samples
        if transforms:  # for transform_input
            self.tiles = np.empty((4, 4, samples, th, tw, C), dtype=dtype)
            self.tile_rows = self.tiles.reshape(4, -1)
            self.half = np.empty((4, 4, T * C), dtype=dtype)  # B^T over the tiles' rows
            self.half_rows = self.half.reshape(4, -1)
            self.v = np.empty((16, T, C), dtype=dtype)
            self.v_cols = self.v.reshape(4, 4, T * C)
        self.m = np.empty((16, T, F), dtype=dtype)
        self.m_rows = self.m.reshape(16, -1)
        self.out_tiles = np.empty((2, 2, samples, th, tw, F), dtype=dtype) if out_tiles else None
        self.out_rows = self.out_tiles.reshape(4, -1) if out_tiles else None
        self._b_t = B_T.astype(dtype)

    def transform_input(self, tiles, into=None):
        """v = ``B^T d B`` of every tile d in ``tiles`` (this chunk's samples), as two products with B^T:
        over the tiles' rows, then their columns. One product with kron(B^T, B^T) (16 x 16) made twice the
        multiply-adds: for 64 channels of 64 tiles 33 against 18 us, for 32 channels the same 11 us.
        ``into``: (v, its (4, 4, T*C) view) to write instead of this chunk's own v."""
        v, v_cols = into or (self.v, self.v_cols)
        np.copyto(self.tiles, tiles)
        np.matmul(self._b_t, self.tile_rows, out=self.half_rows)
        np.matmul(self._b_t, self.half, out=v_cols)
        return v


def _chunks(tiles_shape, F, dtype, out_tiles=False, transforms=True):
    """(first sample, :class:`_Chunk`) for every chunk of the samples of tiles shaped (4, 4, N, th, tw, C):
    about CHUNK_BYTES of transformed input and products each, the last one shorter where N does not divide."""
    _, _, N, th, tw, C = tiles_shape
    step = max(1, min(N, CHUNK_BYTES // (16 * th * tw * (C + F) * np.dtype(dtype).itemsize)))
    chunk = _Chunk(step, (th, tw), C, F, dtype, out_tiles, transforms)
    for n in range(0, N - N % step, step):
        yield n, chunk
    if N % step:
        yield N - N % step, _Chunk(N % step, (th, tw), C, F, dtype, out_tiles, transforms)


def _convolve(tiles, u, output, keep=None):
    """Fill ``output`` = (result, its tiles view (2, 2, N, th, tw, F)) with the convolution of the input
    ``tiles`` (4, 4, N, th, tw, C) with transformed weights u (16, C, F); returns the result. ``keep``:
    an array (16, N*th*tw, C) to hold the transformed input tiles of the whole batch."""
    result, dest = output
    N, F = tiles.shape[2], u.shape[2]
    per_sample = tiles.shape[3] * tiles.shape[4]
    a_t = OUTPUT.astype(u.dtype)
    # tiles memory (pool blocks) takes the products straight in; an image's tiles view through a copy
    dest_rows = dest.reshape(4, N, -1) if dest.flags.c_contiguous else None
    for n, chunk in _chunks(tiles.shape, F, u.dtype, out_tiles=dest_rows is None):
        s = chunk.samples
        into = None if keep is None else _kept(keep, n, s, per_sample)
        np.matmul(chunk.transform_input(tiles[:, :, n:n + s], into), u, out=chunk.m)
        if dest_rows is not None:
            np.matmul(a_t, chunk.m_rows, out=dest_rows[:, n:n + s].reshape(4, -1))
        else:
            np.matmul(a_t, chunk.m_rows, out=chunk.out_rows)
            np.copyto(dest[:, :, n:n + s], chunk.out_tiles)
    return result
