"""Array kernels behind the layers: output sizes, im2col/col2im, window taps.

Plain functions on NumPy arrays. They loop over kernel taps (at most kh*kw
iterations), never over samples or pixels.
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided


def conv_output_size(size, kernel_size, stride=1, padding=0):
    """Output length of a convolution or pooling along one axis.

    ``(size + 2*padding - kernel_size) // stride + 1``; may be < 1 when the
    window does not fit, which callers turn into a clear error.
    """
    return (size + 2 * padding - kernel_size) // stride + 1


def pad2d(x, padding):
    """Zero-pad the two spatial axes of an (N, C, H, W) array."""
    if padding == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


def im2col(x, kh, kw, stride=1, padding=0):
    """Unfold image patches into rows.

    Shape:
        x: (N, C, H, W) -> col: (N*out_h*out_w, C*kh*kw), rows ordered (n, oh, ow),
        columns ordered (c, i, j) so that ``col @ weight.reshape(F, -1).T`` is the
        convolution with a torch-layout weight (F, C, kh, kw).

    One strided view of the padded input and one copy: no loop at all.
    """
    N, C, H, W = x.shape
    out_h = conv_output_size(H, kh, stride, padding)
    out_w = conv_output_size(W, kw, stride, padding)
    xp = pad2d(x, padding)
    sn, sc, sh, sw = xp.strides
    patches = as_strided(
        xp,
        shape=(N, out_h, out_w, C, kh, kw),
        strides=(sn, sh * stride, sw * stride, sc, sh, sw),
        writeable=False,
    )
    return patches.reshape(N * out_h * out_w, C * kh * kw)


def col2im(col, x_shape, kh, kw, stride=1, padding=0):
    """Fold patch rows back into an image, summing overlapping taps (adjoint of im2col).

    Shape:
        col: (N*out_h*out_w, C*kh*kw) -> dx: x_shape = (N, C, H, W)

    One strided slice-add per kernel tap (kh*kw of them), far cheaper than
    ``np.add.at`` over every index.
    """
    N, C, H, W = x_shape
    out_h = conv_output_size(H, kh, stride, padding)
    out_w = conv_output_size(W, kw, stride, padding)
    # (N, oh, ow, C, i, j) -> (i, j, N, C, oh, ow) so each tap is one contiguous block
    taps = col.reshape(N, out_h, out_w, C, kh, kw).transpose(4, 5, 0, 3, 1, 2)
    dxp = np.zeros((N, C, H + 2 * padding, W + 2 * padding), dtype=col.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride] += taps[i, j]
    if padding == 0:
        return dxp
    return dxp[:, :, padding:-padding, padding:-padding]


def window_taps(x, kh, kw, stride, out_h, out_w):
    """Yield ((i, j), view) for every tap of a (kh, kw) window sliding with ``stride``.

    Each view has shape (N, C, out_h, out_w): element [n, c, a, b] is
    x[n, c, a*stride + i, b*stride + j]. Views, not copies.
    """
    for i in range(kh):
        for j in range(kw):
            yield (i, j), x[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]


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
