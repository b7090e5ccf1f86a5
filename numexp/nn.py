"""Layers written like ``torch.nn``: same names, argument order, weight shapes and state-dict keys.

Every layer follows one small contract:

- ``out = layer(x)`` (``layer.forward(x)``) caches in ``self._cache`` what backward needs;
- ``dx = layer.backward(dout)`` returns the input gradient, writes ``self.grads[name]``
  (overwriting: there is no ``zero_grad``) and never modifies ``dout``;
- ``params`` / ``grads`` / ``buffers`` are dicts keyed like torch (``weight``, ``bias``,
  ``running_mean``, ``running_var``); ``train()`` / ``eval()`` switch Dropout and BatchNorm.

Parameters are created in the default dtype (float32; :func:`set_default_dtype` changes it,
e.g. to float64 for gradient checks) and layers keep the dtype of their input.
"""
import zipfile
from collections import OrderedDict

import numpy as np

from numexp import blas, kernels, winograd
from numexp.atomic import atomic_open

_default_dtype = np.dtype(np.float32)


def set_default_dtype(dtype):
    """Set the dtype new parameters are created in (float32 unless changed)."""
    global _default_dtype
    _default_dtype = np.dtype(dtype)


def get_default_dtype():
    return _default_dtype


# --------------------------------------------------------------------------- init

def kaiming_normal(shape, fan_in, rng):
    """He initialisation for ReLU nets: N(0, 2 / fan_in)."""
    return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)


def xavier_normal(shape, fan_in, fan_out, rng):
    """Glorot initialisation: N(0, 2 / (fan_in + fan_out))."""
    return rng.standard_normal(shape) * np.sqrt(2.0 / (fan_in + fan_out))


def torch_default_uniform(shape, fan_in, rng):
    """torch's default for Linear/Conv2d weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape)


# --------------------------------------------------------------------------- base

class Module:
    """Base class: parameter/buffer dicts, children, train/eval, state dict.

    Attributes:
        params, grads, buffers: dict name -> ndarray of this module only.
        reg_keys: names of the params that the seed's ``reg`` penalty applies to
            (``weight`` of Linear and Conv2d; nothing for BatchNorm or biases).
    """

    reg_keys = ()
    # False on a network's first layer skips the input gradient nobody uses (as torch does for inputs)
    needs_input_grad = True

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self.training = True
        self._children = OrderedDict()
        self._cache = None

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def _grad_buffer(self, key):
        """The array to write ``grads[key]`` into: last step's when it fits, so large gradients
        (FC1's 12.6M weights) are not freshly allocated, page-faulted and freed every step."""
        p, g = self.params[key], self.grads.get(key)
        if g is None or g.shape != p.shape or g.dtype != p.dtype:
            g = np.empty_like(p)
        return g

    def output_shape(self, in_shape):
        """Shape of one sample's output, given one sample's input shape (no batch axis)."""
        return tuple(in_shape)

    def add_module(self, name, module):
        self._children[name] = module
        return module

    def children(self):
        return self._children.items()

    def release_caches(self):
        """Drop what the last forward kept for backward, in this module and every descendant."""
        for _, module in self.named_modules():
            module._cache = None
            module.__dict__.pop("_ran", None)

    def named_modules(self, prefix=""):
        """Yield (dotted name, module) for this module and every descendant."""
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def param_slots(self):
        """Yield (dotted name, module, key, regularised) for every parameter, in a fixed order."""
        for prefix, module in self.named_modules():
            for key in module.params:
                name = f"{prefix}.{key}" if prefix else key
                yield name, module, key, key in module.reg_keys

    def named_params(self):
        """Yield (dotted name, array), e.g. ``("conv1.weight", w)``."""
        for name, module, key, _ in self.param_slots():
            yield name, module.params[key]

    def named_grads(self):
        for name, module, key, _ in self.param_slots():
            yield name, module.grads.get(key)

    def named_buffers(self):
        for prefix, module in self.named_modules():
            for key, value in module.buffers.items():
                yield (f"{prefix}.{key}" if prefix else key), value

    def num_params(self):
        return sum(p.size for _, p in self.named_params())

    def train(self, mode=True):
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        """Copies of every parameter and buffer, keyed by dotted name."""
        state = OrderedDict((k, v.copy()) for k, v in self.named_params())
        state.update((k, v.copy()) for k, v in self.named_buffers())
        return state

    def load_state_dict(self, state):
        """Copy arrays into the existing parameters and buffers (in place, keeping their dtype).

        Raises:
            KeyError: a key is missing or unexpected (named in the message).
            ValueError: an array's shape differs (key and both shapes in the message).
        """
        targets = OrderedDict(self.named_params())
        targets.update(self.named_buffers())
        missing = [k for k in targets if k not in state]
        unexpected = [k for k in state if k not in targets]
        if missing or unexpected:
            raise KeyError(f"state dict does not fit the model: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        for key, target in targets.items():
            value = np.asarray(state[key])
            if value.shape != target.shape:
                raise ValueError(f"state dict key '{key}' has shape {value.shape}, "
                                 f"the model expects {target.shape}")
            np.copyto(target, value, casting="same_kind")

    def extra_repr(self):
        return ""

    def __repr__(self):
        if not self._children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ")
                 for name, child in self._children.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"


def save_npz(path, state):
    """Write a state dict to ``path`` as an uncompressed ``.npz``, atomically (temp file + rename)."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in state.items()})


class CheckpointError(ValueError):
    """A parameter file that cannot be trusted or read."""


def load_npz(path):
    """Read a state dict written by :func:`save_npz`; never unpickles.

    Raises:
        CheckpointError: the file is missing, not an npz, or holds object (pickled) arrays.
    """
    try:
        with open(path, "rb") as f:
            signature = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    if signature != b"PK\x03\x04":
        raise CheckpointError(f"checkpoint {path} is not a valid .npz file (no zip signature)")
    try:
        with np.load(path, allow_pickle=False) as f:
            return OrderedDict((k, f[k]) for k in f.files)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise CheckpointError(f"checkpoint {path} contains pickled objects; numexp refuses "
                                  f"to unpickle (it could run arbitrary code)") from None
        raise CheckpointError(f"checkpoint {path} is not a valid .npz file: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint {path} is not a valid .npz file: {e}") from None


# --------------------------------------------------------------------------- layers

def _column_sums(rows):
    """Sum over axis 0 of a 2-D array as a GEMV with a ones vector: far faster than ``sum(axis=0)``
    on tall arrays, whose reduction runs across the fast axis."""
    return np.ones(rows.shape[0], dtype=rows.dtype) @ rows


# On one BLAS thread Linear's forward takes weights of BLOCKED_WEIGHT_BYTES or more ROW_BLOCK rows at a time:
# SimpleNet's FC1 (3072 x 4096, batch 64) 19.1 -> 17.8 ms alone (blocks of 256: 18.2, 128: 19.0), its training
# step 92.4 -> 90.8 ms (8 alternating rounds). On two threads the whole product splits better.
ROW_BLOCK = 512
BLOCKED_WEIGHT_BYTES = 8 << 20
# On one BLAS thread Linear's input gradient dout @ W, for weights of BLOCKED_WEIGHT_BYTES or more, is a sum over
# blocks of GRAD_ROWS rows of W (the inner size), each added into dx by a gemm with beta = 1 (numexp.blas). SimpleNet's
# FC1 alone, Xeon: 20.4 -> 15.9 ms (blocks of 32: 17.9, 48: 16.7, 96: 17.1, 128: 18.9, 256: 20.0); its training step
# 1.64 ms shorter (median of 30 alternating pairs; before, each block's update followed its product, and the 1 MB
# input was packed again for each of the 48 updates: whole, the update took 13.1 against 15.6 ms). On two threads
# the blocks took 9.2 against 10.8 ms alone, but the step's head backward 0.5 ms longer: whole there.
GRAD_ROWS = 64


def input_grad(dout, w, x):
    """``dout @ w`` (N, in) for dout (N, out) and weights w (out, in), in the memory order of x (N, in): x is
    often a transposed output through a ReLU, whose backward multiplies dx by a mask laid out like x, and
    ufuncs over mixed layouts crawl (4x here). Large weights on one BLAS thread: a block of GRAD_ROWS rows at a time."""
    f_order = x.flags.f_contiguous and not x.flags.c_contiguous
    if w.nbytes >= BLOCKED_WEIGHT_BYTES and w.dtype == dout.dtype and blas.threads() == 1:
        dx = np.zeros_like(x, dtype=w.dtype, order="F" if f_order else "C")
        d_t = np.ascontiguousarray(dout.T)  # (out, N): its blocks of rows are contiguous
        for start in range(0, len(w), GRAD_ROWS):
            block, d_block = w[start:start + GRAD_ROWS], d_t[start:start + GRAD_ROWS]
            done = (blas.gemm_at_b(dx.T, block, d_block, 1.0, 1.0) if f_order
                    else blas.gemm_at_b(dx, d_block, block, 1.0, 1.0))
            if not done:  # no direct gemm for these arrays: on the first block, dx still zero
                break
        else:
            return dx
    return (w.T @ dout.T).T if f_order else dout @ w


class Linear(Module):
    """Affine map ``out = x @ weight.T + bias``.

    Args:
        in_features, out_features: sizes; bias: add a learnable bias.
        rng: np.random.Generator for the initial values (torch's default uniform).

    Shape:
        x: (N, in_features) -> out: (N, out_features)

    Attributes:
        weight: (out_features, in_features); bias: (out_features,).
    """

    reg_keys = ("weight",)
    # set by SGD.fuse_into_backward: fused_update(layer, dout, x) updates the weight in backward
    fused_update = None

    def __init__(self, in_features, out_features, bias=True, rng=None):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.in_features, self.out_features = in_features, out_features
        dt = _default_dtype
        self.params["weight"] = torch_default_uniform((out_features, in_features), in_features, rng).astype(dt)
        if bias:
            self.params["bias"] = torch_default_uniform((out_features,), in_features, rng).astype(dt)

    def forward(self, x):
        self._cache = x
        w = self.params["weight"]
        # (W @ x.T).T: OpenBLAS runs this orientation ~20% faster for wide layers (FC1: 4096 -> 3072);
        # on one thread, a block of W's rows at a time is faster still (see ROW_BLOCK)
        out_t = np.empty((len(w), len(x)), dtype=np.result_type(w, x))
        step = ROW_BLOCK if w.nbytes >= BLOCKED_WEIGHT_BYTES and blas.threads() == 1 else len(w)
        for start in range(0, len(w), step):
            np.matmul(w[start:start + step], x.T, out=out_t[start:start + step])
        out = out_t.T
        if "bias" in self.params:
            out += self.params["bias"]
        return out

    def backward(self, dout):
        x = self._cache
        w = self.params["weight"]
        dx = input_grad(dout, w, x) if self.needs_input_grad else None  # before a fused update changes w
        if self.fused_update is not None:
            self.fused_update(self, dout, x)
            self.grads.pop("weight", None)
        else:
            self.grads["weight"] = np.matmul(dout.T, x, out=self._grad_buffer("weight"))
        if "bias" in self.params:
            self.grads["bias"] = _column_sums(dout)
        return dx

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"Linear({self.in_features}, {self.out_features}) got input shape {tuple(in_shape)}")
        return (self.out_features,)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self.params}"


# How an im2col Conv2d unfolds, as measured (ms for resnet_small's 16-channel 3x3 layers at 28x28: forward,
# weight gradient, input gradient):
# - on one BLAS thread, with stride 1 and rows of kernels.WIDE_ROWS values or more, the unfold is never kept but
#   built a chunk of samples at a time in cache, forward and again for the weight gradient (6.3 -> 4.7 and 4.5 ->
#   4.4); with at most NARROW_TAPS output channels F (the inner size of kernels.col2im_product's per-tap GEMMs) the
#   input gradient is a flipped-kernel convolution in the same chunks (6.0 -> 4.6). resnet_small's training step
#   75.4 -> 69.0 ms. SimpleNet's conv2 (F = 64) keeps no unfold either; its input gradient that way took 8.2 ms
#   against 8.4 for per-tap GEMMs on AMD Zen 4 (Haswell kernels), 7.3 against 8.3 on a Xeon (AVX-512 kernels);
# - on more BLAS threads one large GEMM splits better than chunks in cache (two threads: 4.8 against 5.8, 2.8
#   against 6.2, 4.5 against 5.7), so the whole unfold is kept and the input gradient takes per-tap GEMMs.
NARROW_TAPS = 64

# Input channels from which "auto" picks Winograd for 3x3, stride-1, padding-1 convolutions (numexp.winograd).
# Forward + backward, batch 64, one thread, Xeon (ms, im2col against Winograd): 32 -> 64 channels at 16x16
# into 2x2 pool blocks (SimpleNet's conv2) 20.2 / 14.4, 32 -> 32 at 14x14 9.1 / 7.1, 64 -> 64 at 8x8 8.8 / 6.1;
# but 16 -> 16 at 28x28 13.9 / 14.6, 16 -> 32 20.9 / 20.3, 8 -> 8 6.0 / 8.9 and SimpleNet's conv1 (3 -> 32) slower
# too. Steps: SimpleNet 79.6 -> 73.6 ms; resnet_small 78.1 -> 76.6 with its 32-channel layers, unchanged with
# its 16-channel ones too.
WINOGRAD_CHANNELS = 32
# Winograd's output tiles where the image cuts into 4x4 tiles: F(4x4, 3x3) (winograd.F4) makes 36 products per
# 16 outputs where F(2x2, 3x3) makes 16 per 4, at a float32 error of about 5e-6 of the output's scale against
# 3e-7. SimpleNet's step at one thread 2.9 ms shorter (30 alternating pairs, 87% faster), at two threads
# (replicas) 48.2-50.8 -> 45.6-52.4 ms, medians 50.6 -> 47.0 (five alternating process pairs). Max-pool ties
# (integer data) may go to another tap than a direct convolution's. 2 keeps F(2x2, 3x3) everywhere.
WINOGRAD_TILE = 4
# With 4x4 tiles "auto" picks Winograd from this many input channels too, for inputs that cut into 4x4 tiles
# (the layer runs im2col on others): resnet_small's two 16 -> 16 layers at 28x28 took its step at one thread
# 79.6 -> 72.7 ms (20 alternating pairs, all faster); with 2x2 tiles they gained 0.6 ms.
WINOGRAD4_CHANNELS = 16


class Conv2d(Module):
    """2-D convolution (cross-correlation, as in torch).

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as torch (square kernels).
        bias: add a learnable bias per output channel.
        method: ``"auto"`` (``"batch_last"`` for fewer than 16 input channels and kernels of 5x5
            or more, else ``"taps"`` for one input channel, else ``"im2col"``), ``"im2col"`` (one
            strided unfold into channels-last rows and one GEMM), ``"taps"`` (the unfold transposed
            and sample by sample, (N, C*k*k, H_out*W_out): far cheaper to build with one input
            channel), ``"batch_last"`` (the unfold transposed with the batch fastest, (k*k*C,
            H_out*W_out*N): its copy and the slice-adds of the input gradient run over whole runs
            of the batch), ``"winograd"`` (:mod:`numexp.winograd`, F(4x4, 3x3) where the input's sides are multiples
            of 4 (see WINOGRAD_TILE), else F(2x2, 3x3): 3x3 kernels, stride 1, padding 1 and even input
            sizes, on one BLAS thread; im2col otherwise) or ``"naive"``
            (loops over output pixels; the reference for tests). ``"auto"`` takes ``"winograd"``
            for 3x3, stride 1 and padding 1 from WINOGRAD_CHANNELS input channels on, and from
            WINOGRAD4_CHANNELS on for inputs that cut into 4x4 tiles (im2col for others).

    Shape:
        x: (N, C_in, H, W) -> out: (N, C_out, H_out, W_out),
        H_out = (H + 2*padding - kernel_size) // stride + 1

    Attributes:
        weight: (out_channels, in_channels, kernel_size, kernel_size); bias: (out_channels,).
    """

    reg_keys = ("weight",)
    METHODS = ("im2col", "taps", "batch_last", "winograd", "naive")
    # "winograd" asked for by name runs with any tile; "auto" may ask for 4x4 ones (see __init__)
    min_winograd_tile = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 method="auto", rng=None):
        super().__init__()
        if method not in ("auto",) + self.METHODS:
            raise ValueError(f"Conv2d method must be 'auto' or one of {self.METHODS}, got {method!r}")
        if method == "auto":
            few_channels = in_channels < 16 and kernel_size >= 5  # measured: see kernels.col2im_batch_last
            method = "batch_last" if few_channels else "taps" if in_channels == 1 else "im2col"
            if (kernel_size, stride, padding) == (3, 1, 1) and in_channels >= WINOGRAD4_CHANNELS:
                method = "winograd"
            # the smallest Winograd tile that pays for this layer (WINOGRAD_CHANNELS, WINOGRAD4_CHANNELS)
            self.min_winograd_tile = 2 if in_channels >= WINOGRAD_CHANNELS else 4
        rng = rng if rng is not None else np.random.default_rng()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.method = kernel_size, stride, padding, method
        fan_in = in_channels * kernel_size * kernel_size
        dt = _default_dtype
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.params["weight"] = torch_default_uniform(shape, fan_in, rng).astype(dt)
        if bias:
            self.params["bias"] = torch_default_uniform((out_channels,), fan_in, rng).astype(dt)

    # set by Sequential for one forward call when a pool-first group follows (see Sequential.forward):
    # the output then comes as kernels.pool_blocks, (pool*pool, N, F, H_out/pool, W_out/pool)
    pool_blocks = 1

    def blocks_for(self, x_shape, pool):
        """Whether :attr:`pool_blocks` = ``pool`` works for an input of ``x_shape``: pooling windows
        that tile the output exactly (and not the naive reference method)."""
        _, _, H, W = x_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        return (self.method != "naive" and kernels.conv_output_size(H, k, s, p) % pool == 0
                and kernels.conv_output_size(W, k, s, p) % pool == 0)

    def forward(self, x):
        return self.forward_with(x, self.params["weight"], self.params.get("bias"))

    def forward_with(self, x, w, b):
        """:meth:`forward` with weight ``w`` and bias ``b`` (or None) in place of the parameters: a
        :class:`ConvBN` folds a BatchNorm into them. The cache then holds what they give, not the
        parameters', so only :meth:`ConvBN.backward` may follow."""
        if self.method == "naive":
            self._cache = x
            return kernels.conv2d_naive(x, w, b, self.stride, self.padding)
        if self.method == "taps":
            return self._forward_taps(x, w, b)
        if self.method == "batch_last":
            return self._forward_batch_last(x, w, b)
        if self._winograd_applies(x.shape):
            return self._forward_winograd(x, w, b)
        N, _, H, W = x.shape
        k, s, p, F, pool = self.kernel_size, self.stride, self.padding, self.out_channels, self.pool_blocks
        out_h, out_w = kernels.conv_output_size(H, k, s, p), kernels.conv_output_size(W, k, s, p)
        w_rows = w.transpose(0, 2, 3, 1).reshape(F, -1)  # (F, k*k*C), matching im2col's columns
        # col: (N*out_h*out_w, k*k*C); out: (N*out_h*out_w, F), channels-last memory. On one BLAS thread col
        # is kept for the weight gradient only where unfolding x again there costs more (see NARROW_TAPS):
        # narrow rows (SimpleNet's conv1: 2.8 -> 3.6 ms) and strides (resnet_small's: 1.3 -> 1.9 ms)
        narrow_or_strided = w_rows.shape[1] < kernels.WIDE_ROWS or s > 1
        keep = blas.threads() > 1 or (self.training and narrow_or_strided)
        col, out = kernels.im2col_matmul(x, w_rows, k, k, s, p, pool, keep_col=keep)
        if b is not None:
            kernels.add_channel_bias(out, b)
        self._cache = (x.shape, col, w_rows, x if col is None else None, pool)
        if pool > 1:  # rows (tap, n, ph, pw)
            return out.reshape(pool * pool, N, out_h // pool, out_w // pool, F).transpose(0, 1, 4, 2, 3)
        return kernels.channels_first(out.reshape(N, out_h, out_w, F))

    def backward(self, dout):
        """dout: (N, F, H_out, W_out), or pool blocks after a forward call that returned them."""
        w = self.params["weight"]
        if self.method == "naive":
            dx, dw, db = kernels.conv2d_naive_backward(dout, self._cache, w, self.stride, self.padding)
            self.grads["weight"] = dw
            if "bias" in self.params:
                self.grads["bias"] = db
            return dx
        if self.method == "taps":
            return self._backward_taps(dout, w)
        if self.method == "batch_last":
            return self._backward_batch_last(dout)
        if isinstance(self._cache[1], str):  # ("winograd" in the forward)
            return self._backward_winograd(dout, w)
        x_shape, col, w_rows, x, pool = self._cache
        F, k = self.out_channels, self.kernel_size
        if pool > 1 and dout.ndim == 4:  # the group after this layer ran layer by layer after all
            dout = kernels.pool_blocks(dout, pool)
        # rows ordered like col's; free for our own outputs
        d2 = (dout.transpose(0, 1, 3, 4, 2) if pool > 1 else kernels.channels_last(dout)).reshape(-1, F)
        if col is None:
            dw_rows = kernels.im2col_weight_grad(x, d2, k, k, self.stride, self.padding, pool)
        elif blas.threads() == 1:  # narrow rows (conv1's 27): this orientation, in pieces, is faster
            dw_rows = kernels.inner_matmul_pieces(col.T, d2).T
        else:
            dw_rows = d2.T @ col  # (F, k*k*C)
        self.grads["weight"] = dw_rows.reshape(F, k, k, -1).transpose(0, 3, 1, 2).copy()
        if "bias" in self.params:
            self.grads["bias"] = _column_sums(d2)
        if not self.needs_input_grad:
            return None
        if pool > 1:  # both ways below want rows in image order
            d2 = kernels.channels_last(kernels.unpool_blocks(dout, pool, channels_last=True)).reshape(-1, F)
        if self.stride == 1 and self.padding < k and F <= NARROW_TAPS and blas.threads() == 1:
            return kernels.input_grad_by_convolution(d2, w, x_shape, self.padding)
        w_taps = np.ascontiguousarray(w_rows.reshape(F, k * k, -1).transpose(1, 0, 2))  # (k*k, F, C)
        return kernels.col2im_product(d2, w_taps, x_shape, k, k, self.stride, self.padding)

    def _winograd_applies(self, x_shape):
        """Whether this forward call runs as Winograd: the method, settings and input allow it, on one BLAS
        thread (on more, im2col's one large GEMM splits better than small products in cache), and the
        output is wanted whole or in 2x2 pool blocks (its tiles)."""
        return (self.method == "winograd" and self.pool_blocks in (1, 2) and blas.threads() == 1
                and winograd.applies(x_shape, self.kernel_size, self.stride, self.padding)
                and self._winograd_tiling(x_shape).m >= self.min_winograd_tile)

    @staticmethod
    def _winograd_tiling(x_shape):
        return winograd.tiling_for(x_shape) if WINOGRAD_TILE == 4 else winograd.F2

    def _forward_winograd(self, x, w, b):
        N, _, H, W = x.shape
        F, pool = self.out_channels, self.pool_blocks
        # training keeps the transformed input for the weight gradient (8.4 MB for SimpleNet's conv2, whose
        # forward + weight gradient took 9.1 -> 8.2 ms that way)
        layout = "blocks" if pool == 2 else "image"
        tiling = self._winograd_tiling(x.shape)
        out, v = winograd.conv(x, winograd.transform_weights(w, tiling), layout, keep=self.training, tiling=tiling)
        if b is not None:
            kernels.add_channel_bias(out.reshape(-1, F), b)
        self._cache = (x.shape, "winograd", x, v, tiling, pool)
        if pool == 2:  # the tiles' memory is pool blocks' (tap, n, ph, pw, F)
            return out.reshape(4, N, H // 2, W // 2, F).transpose(0, 1, 4, 2, 3)
        return kernels.channels_first(out)

    def _backward_winograd(self, dout, w):
        """dout: pool blocks (4, N, F, H/2, W/2) after a forward call that returned them, else (N, F, H, W)."""
        _, _, x, v, tiling, _ = self._cache
        F = self.out_channels
        if dout.ndim == 5:  # (tap, n, F, ph, pw) -> tiles (a, b, n, ph, pw, F): a view of blocks memory
            _, N, _, ph, pw = dout.shape
            tiles = dout.transpose(0, 1, 3, 4, 2).reshape(2, 2, N, ph, pw, F)
        else:
            tiles = winograd.image_tiles(kernels.channels_last(dout))
        padded = None
        if tiling.m == 2:
            self.grads["weight"] = winograd.weight_grad(x, tiles, v)
        else:  # 4x4 tiles of the gradient image, padded for the input gradient's convolution as well
            padded = winograd.padded_gradient(tiles)
            self.grads["weight"] = winograd.weight_grad(x, winograd.image_tiles(padded[:, 1:-1, 1:-1], tiling.m), v,
                                                        tiling)
        if "bias" in self.params:
            self.grads["bias"] = tiles.sum(axis=(0, 1, 2, 3, 4))
        if not self.needs_input_grad:
            return None
        return kernels.channels_first(winograd.input_grad(tiles, w, tiling, padded))

    def _forward_taps(self, x, w, b):
        """The ``"taps"`` method: out[n] = w (F, C*k*k) @ col[n] (C*k*k, out_h*out_w), NCHW memory."""
        N, _, H, W = x.shape
        k, s, p, F, pool = self.kernel_size, self.stride, self.padding, self.out_channels, self.pool_blocks
        out_h, out_w = kernels.conv_output_size(H, k, s, p), kernels.conv_output_size(W, k, s, p)
        col = kernels.im2col_taps(x, k, k, s, p, pool)
        out = np.matmul(w.reshape(F, -1), col)  # (N, F, out_h*out_w)
        if b is not None:
            out += b[:, None]
        self._cache = (x.shape, col, pool)
        if pool > 1:  # columns (tap, ph, pw)
            return out.reshape(N, F, pool * pool, out_h // pool, out_w // pool).transpose(2, 0, 1, 3, 4)
        return out.reshape(N, F, out_h, out_w)

    def _backward_taps(self, dout, w):
        x_shape, col, pool = self._cache
        F = self.out_channels
        if pool > 1:
            if dout.ndim == 4:  # the group after this layer ran layer by layer after all
                dout = kernels.pool_blocks(dout, pool, channels_last=False)
            dout = dout.transpose(1, 2, 0, 3, 4)  # (N, F, tap, ph, pw), like col's columns
        d = np.ascontiguousarray(dout).reshape(len(dout), F, -1)  # (N, F, out_h*out_w), free for our own
        # a small GEMM per sample, summed: in cache, unlike one GEMM with an N*out_h*out_w inner size
        self.grads["weight"] = np.matmul(d, col.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
        if "bias" in self.params:
            self.grads["bias"] = np.einsum("nfm->f", d)
        if not self.needs_input_grad:
            return None
        k = self.kernel_size
        return kernels.col2im_taps(np.matmul(w.reshape(F, -1).T, d), x_shape, k, k, self.stride, self.padding, pool)

    def _forward_batch_last(self, x, w, b):
        """The ``"batch_last"`` method: out (F, out_h*out_w*N) = w_rows (F, k*k*C) @ col (k*k*C,
        out_h*out_w*N), returned as a view of that batch-fastest memory.

        LeNet-5's conv2 (C = 6, 5x5, 14x14 input) at one thread: 0.71-0.72 ms as im2col rows,
        0.54-0.55 ms this way (the unfold 0.16 ms, the GEMM 0.38 ms)."""
        N, _, H, W = x.shape
        k, s, p, F, pool = self.kernel_size, self.stride, self.padding, self.out_channels, self.pool_blocks
        out_h, out_w = kernels.conv_output_size(H, k, s, p), kernels.conv_output_size(W, k, s, p)
        w_rows = w.transpose(0, 2, 3, 1).reshape(F, -1)  # (F, k*k*C), matching col's rows (i, j, c)
        if self.training:
            col = kernels.im2col_batch_last(x, k, k, s, p, pool)
            out = kernels.matmul_pieces(w_rows, col)
        else:  # nothing will need col: built and multiplied in chunks (a backward unfolds x again)
            col, out = None, kernels.batch_last_matmul(x, w_rows, k, k, s, p, pool)
        if b is not None:
            out += b[:, None]
        self._cache = (x.shape, col, w_rows, x if col is None else None, pool)
        if pool > 1:  # columns (tap, ph, pw, n)
            return out.reshape(F, pool * pool, out_h // pool, out_w // pool, N).transpose(1, 4, 0, 2, 3)
        return out.reshape(F, out_h, out_w, N).transpose(3, 0, 1, 2)

    def _backward_batch_last(self, dout):
        x_shape, col, w_rows, x, pool = self._cache
        F, C, k = self.out_channels, self.in_channels, self.kernel_size
        if col is None:
            col = kernels.im2col_batch_last(x, k, k, self.stride, self.padding, pool)
        if pool > 1 and dout.ndim == 4:  # the group after this layer ran layer by layer after all
            dout = kernels.pool_blocks(dout, pool)
        # (F, columns of col); free for the gradient of our own output, which keeps its memory order
        d = np.ascontiguousarray(dout.transpose((2, 0, 3, 4, 1) if pool > 1 else (1, 2, 3, 0))).reshape(F, -1)
        dw_rows = kernels.inner_matmul_pieces(col, d.T).T  # (F, k*k*C)
        self.grads["weight"] = dw_rows.reshape(F, k, k, C).transpose(0, 3, 1, 2).copy()
        if "bias" in self.params:
            self.grads["bias"] = d.sum(axis=1)
        if not self.needs_input_grad:
            return None
        if pool > 1:  # the fold wants the columns in image order
            d = kernels.batch_last(dout, pool)
        return kernels.col2im_batch_last(d, w_rows, x_shape, k, k, self.stride, self.padding)

    def output_shape(self, in_shape):
        C, H, W = in_shape
        if C != self.in_channels:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels, got {C}")
        k, s, p = self.kernel_size, self.stride, self.padding
        return (self.out_channels, kernels.conv_output_size(H, k, s, p), kernels.conv_output_size(W, k, s, p))

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}")


class _Pool2d(Module):
    """Shared window bookkeeping of MaxPool2d and AvgPool2d (no padding, floor mode, as torch's defaults)."""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size

    def _out_hw(self, H, W):
        k, s = self.kernel_size, self.stride
        return kernels.conv_output_size(H, k, s), kernels.conv_output_size(W, k, s)

    def output_shape(self, in_shape):
        C, H, W = in_shape
        return (C, *self._out_hw(H, W))

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class MaxPool2d(_Pool2d):
    """Max over each window.

    Shape:
        x: (N, C, H, W) -> out: (N, C, H_out, W_out), H_out = (H - kernel_size) // stride + 1

    Note:
        On ties the gradient goes to the first maximum in row-major window order, as in torch.
    """

    def forward(self, x):
        N, C, H, W = x.shape
        out_h, out_w = self._out_hw(H, W)
        k, s = self.kernel_size, self.stride
        taps = kernels.window_taps(x, k, k, s, out_h, out_w)
        _, out = next(taps)
        out = out.copy(order="K")  # keep the input's memory layout (channels-last after a conv)
        for _, view in taps:
            np.maximum(out, view, out=out)
        self._cache = (x, out)
        return out

    def backward(self, dout):
        x, out = self._cache
        _, _, out_h, out_w = out.shape
        k, s = self.kernel_size, self.stride
        # windows that tile the input exactly write every element of dx once: no zero fill needed
        tiled = s == k and x.shape[2] == k * out_h and x.shape[3] == k * out_w
        dx = np.empty_like(x) if tiled else np.zeros_like(x)
        self.scatter(dout, dx, add=False)
        return dx

    def scatter(self, dout, dx, add):
        """Send each window's gradient ``dout`` to its first maximum in ``dx`` (written, or added
        with ``add``); ``dx`` must be zero where nothing is written unless ``add``."""
        x, out = self._cache
        _, _, out_h, out_w = out.shape
        k, s = self.kernel_size, self.stride
        # masks in the memory order of out (channels-last after a conv): ufuncs over mixed layouts crawl
        taps = list(kernels.window_taps(x, k, k, s, out_h, out_w))
        for ((i, j), _), first in zip(taps, kernels.first_maxima([view for _, view in taps], out)):
            where = kernels.tap_slice(i, j, s, out_h, out_w)
            if s >= k and not add:  # windows do not overlap: each input gets at most one gradient
                np.multiply(dout, first, out=dx[where])
            else:
                dx[where] += dout * first


class AvgPool2d(_Pool2d):
    """Mean over each window.

    Shape:
        x: (N, C, H, W) -> out: (N, C, H_out, W_out), H_out = (H - kernel_size) // stride + 1
    """

    def forward(self, x):
        N, C, H, W = x.shape
        out_h, out_w = self._out_hw(H, W)
        k, s = self.kernel_size, self.stride
        taps = kernels.window_taps(x, k, k, s, out_h, out_w)
        _, out = next(taps)
        out = out.copy(order="K")  # keep the input's memory layout: ufuncs over mixed layouts crawl
        for _, view in taps:
            out += view
        out *= 1.0 / (k * k)
        self._cache = x  # for its memory layout; the layer before keeps it anyway
        return out

    def backward(self, dout):
        x = self._cache
        _, _, out_h, out_w = dout.shape
        k, s = self.kernel_size, self.stride
        share = np.empty_like(x[:, :, :out_h, :out_w])  # in the input's memory layout, as dx
        np.multiply(dout, 1.0 / (k * k), out=share)
        # windows that tile the input exactly write every element of dx once: no zero fill needed
        tiled = s == k and x.shape[2] == k * out_h and x.shape[3] == k * out_w
        dx = np.empty_like(x) if tiled else np.zeros_like(x)
        for i in range(k):
            for j in range(k):
                where = kernels.tap_slice(i, j, s, out_h, out_w)
                if tiled:
                    dx[where] = share
                else:
                    dx[where] += share
        return dx


class GlobalAvgPool2d(Module):
    """Mean over all spatial positions (torch ``AdaptiveAvgPool2d(1)``).

    Shape:
        x: (N, C, H, W) -> out: (N, C, 1, 1)
    """

    def forward(self, x):
        self._cache = x.shape
        return x.mean(axis=(2, 3), keepdims=True)

    def backward(self, dout):
        N, C, H, W = self._cache
        return np.broadcast_to(dout * (1.0 / (H * W)), (N, C, H, W)).copy()

    def output_shape(self, in_shape):
        return (in_shape[0], 1, 1)


class ReLU(Module):
    """``max(x, 0)``; the gradient at 0 is 0, as in torch."""

    def forward(self, x):
        out = np.maximum(x, 0)
        self._cache = out
        return out

    def backward(self, dout):
        # a ufunc keeps channels-last memory order; np.where iterates in C order, 6x slower here
        return dout * (self._cache > 0)


class Sigmoid(Module):
    """``1 / (1 + exp(-x))``, as torch computes it: four whole-array passes (negate, exp, add, divide)
    into one array in x's memory layout.

    Below x = -88.7 (float32; -709 in float64) exp(-x) overflows to inf and the value is 1 / inf = 0
    where the true one is under 3e-39: no warning is raised for that. Elsewhere the relative error is
    that of float rounding (2.1e-7 in float32 over normal inputs of scale 4). LeNet-5's first
    Sigmoid (64 x 6 x 28 x 28, one thread): 1.44 ms with ``np.where`` over two branches, 0.38 ms as
    ``max(sign(x), e) / (1 + e)`` with e = exp(-|x|) (seven passes, no overflow), 0.21 ms now.
    """

    def forward(self, x):
        out = np.negative(x)
        with np.errstate(over="ignore"):
            np.exp(out, out=out)
        out += 1
        np.divide(1, out, out=out)
        self._cache = out
        return out

    def backward(self, dout):
        out = self._cache
        return dout * out * (1 - out)


class Tanh(Module):
    def forward(self, x):
        out = np.tanh(x)
        self._cache = out
        return out

    def backward(self, dout):
        out = self._cache
        return dout * (1 - out * out)


class Softmax(Module):
    """Softmax over axis 1 (torch ``Softmax(dim=1)``).

    Shape:
        x: (N, K) -> out: (N, K), rows sum to 1
    """

    def forward(self, x):
        shifted = x - x.max(axis=1, keepdims=True)  # exp never overflows
        e = np.exp(shifted)
        out = e / e.sum(axis=1, keepdims=True)
        self._cache = out
        return out

    def backward(self, dout):
        s = self._cache
        return s * (dout - (dout * s).sum(axis=1, keepdims=True))


class Flatten(Module):
    """Shape: x: (N, *dims) -> out: (N, prod(dims))."""

    def forward(self, x):
        self._cache = x
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        x = self._cache
        dx = np.empty_like(x)  # the input's memory layout, so the layers below stay channels-last
        dx[...] = dout.reshape(x.shape)
        return dx

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)


class Dropout(Module):
    """Inverted dropout: in training zero each element with probability p and scale the rest by 1/(1-p).

    Args:
        p: drop probability in [0, 1). rng: np.random.Generator for the masks.
    """

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout p must be in [0, 1), got {p}")
        self.p = p
        self.rng = rng if rng is not None else np.random.default_rng()

    def forward(self, x):
        if not self.training or self.p == 0:
            self._cache = None
            return x
        keep = self.rng.random(x.shape, dtype=np.float32) >= self.p
        mask = keep.astype(x.dtype) * (1.0 / (1 - self.p))
        self._cache = mask
        return x * mask

    def backward(self, dout):
        return dout if self._cache is None else dout * self._cache

    def extra_repr(self):
        return f"p={self.p}"


# the width of the rows that BatchNorm's shifted sums add up: rows of 512 and of 8192 values took as long, and
# the width sets the order of the additions, so it stays at 512 and runs keep the numbers they gave before
SUM_WIDTH = 512


class _BatchNorm(Module):
    """Batch normalisation over every axis but the channel axis 1.

    Train mode normalises with the batch mean and biased variance and updates
    ``running_mean`` / ``running_var`` with momentum (the unbiased variance goes into
    ``running_var``); eval mode uses the running statistics.

    Note:
        torch's convention: ``running = (1 - momentum) * running + momentum * batch``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        dt = _default_dtype
        self.params["weight"] = np.ones(num_features, dtype=dt)
        self.params["bias"] = np.zeros(num_features, dtype=dt)
        self.buffers["running_mean"] = np.zeros(num_features, dtype=dt)
        self.buffers["running_var"] = np.ones(num_features, dtype=dt)

    @staticmethod
    def _rows(x):
        """(M, C) matrix of x with the channel axis 1 last: free for channels-last memory."""
        if x.ndim == 2:
            return x
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])

    @staticmethod
    def _unrows(rows, shape):
        """Inverse of :meth:`_rows`: an array of ``shape`` viewing ``rows``."""
        if len(shape) == 2:
            return rows
        return np.moveaxis(rows.reshape((shape[0],) + tuple(shape[2:]) + (shape[1],)), -1, 1)

    # set by numexp.parallel.DataParallel while the batch is split over processes: sums every
    # replica's per-channel partial sums, so that each normalises with the whole batch's statistics
    sync = None

    def forward(self, x):
        X = self._rows(x)
        wide, r = kernels.wide_channel_rows(X)  # per-channel vectors tiled r times line up with it
        m = None
        if self.training:
            mean, xhat, var, m = self.batch_moments(X)
            self.update_running(mean, var, m)
            xhat = xhat.reshape(wide.shape)
        else:
            var = self.buffers["running_var"]
            xhat = wide - np.tile(self.buffers["running_mean"], r)
        inv_std = 1 / np.sqrt(var + self.eps)
        xhat *= np.tile(inv_std, r)
        out = xhat * np.tile(self.params["weight"], r)
        out += np.tile(self.params["bias"], r)
        self._cache = (xhat.reshape(X.shape), inv_std, m)
        return self._unrows(out.reshape(X.shape), x.shape)

    def batch_moments(self, X):
        """(mean, X - mean, biased variance, m) over the m rows of the batch, per channel: X (M, C)
        are this process's rows, m = M unless :attr:`sync` adds other replicas' rows."""
        mean, m = self._batch_mean(X)
        wide, r = kernels.wide_channel_rows(X)
        centred = (wide - np.tile(mean, r)).reshape(X.shape)
        return mean, centred, self._mean_square(centred, m), m

    def batch_mean_var(self, X):
        """(mean, biased variance, m) as :meth:`batch_moments`, without the centred copy of X where
        that is safe: the variance from the sums of X and of its squares, E[x²] - mean², when every
        channel's mean² <= var, so the cancellation costs at most a factor of 2 in precision; else
        from the centred rows. SimpleNet's first BatchNorm (2.1M values): 1.4-1.9 -> 0.6-0.8 ms.

        Where the running statistics say that the means are far from zero (running_mean² > running_var in
        some channel), the sums are of X less the running mean, in one pass (:meth:`_shifted_sums`): the
        same cancellation is then small once the running mean has come near the batch's. SimpleNet's second
        BatchNorm sees non-negative inputs (after ReLU and pooling), 30 of its 64 channels with mean² > var at
        initialisation: its statistics took three passes over the 1M values, now one (on its rows alone at one
        thread, 1.95-2.01 -> 1.00-1.09 ms; the chunked centred pass alone, 1.57-1.68)."""
        shift = self.buffers["running_mean"]
        if (shift * shift > self.buffers["running_var"]).any():  # the same buffers in every replica
            shift = shift.astype(X.dtype)  # a copy: the leader updates the buffers after the sums
            offset, var, m = self._moments(*self._shifted_sums(X, shift), X.shape[0])
            mean = shift + offset
        else:
            offset, var, m = self._moments(_column_sums(X), np.einsum("ij,ij->j", X, X), X.shape[0])
            mean = offset
        if (offset * offset <= var).all():  # the same totals, so every replica takes the same branch
            return mean, var, m
        return mean, self._centred_mean_square(X, mean, m), m

    def _moments(self, sums, squares, m):
        """(mean, mean square less the squared mean, m) from the per-channel sums of this process's m rows and
        of their squares, summed over the replicas in one exchange."""
        if self.sync is not None:
            total, m = self.sync.counted_sums(np.concatenate([sums, squares]), m)
            sums, squares = np.split(total, 2)
        mean = sums * (1.0 / m)
        return mean, squares * (1.0 / m) - mean * mean, m

    def _centred_mean_square(self, X, mean, m, chunk_bytes=1 << 20):
        """:meth:`_mean_square` of X - mean, through :meth:`_shifted_sums`: no centred copy of X."""
        squares = self._shifted_sums(X, mean, chunk_bytes)[1]
        if self.sync is not None:
            squares = self.sync.sums(squares)
        return squares * (1.0 / m)

    @staticmethod
    def _shifted_sums(X, shift, chunk_bytes=1 << 20):
        """Per channel, the sums of X - shift and of its squares over the rows X (M, C): a cache-sized chunk of
        rows at a time over the wide rows of :func:`numexp.kernels.wide_channel_rows`, with no shifted copy of X.
        SimpleNet's second BatchNorm (1M values): the centred pass 1.5 -> 0.8 ms with its mean."""
        wide, r = kernels.wide_channel_rows(X, SUM_WIDTH)
        rows = max(1, min(len(wide), chunk_bytes // (wide.shape[1] * wide.itemsize)))
        tiled = np.tile(shift, r)
        buf = np.empty((rows, wide.shape[1]), dtype=np.result_type(X, shift))
        ones = np.ones(rows, dtype=buf.dtype)
        sums, squares = np.zeros(wide.shape[1], dtype=buf.dtype), np.zeros(wide.shape[1], dtype=buf.dtype)
        for start in range(0, len(wide), rows):
            part = wide[start:start + rows]
            shifted = np.subtract(part, tiled, out=buf[:len(part)])
            sums += ones[:len(part)] @ shifted
            squares += np.einsum("ij,ij->j", shifted, shifted)
        return sums.reshape(r, -1).sum(axis=0), squares.reshape(r, -1).sum(axis=0)

    def _batch_mean(self, X):
        sums, m = _column_sums(X), X.shape[0]
        if self.sync is not None:
            sums, m = self.sync.counted_sums(sums, m)
        return sums * (1.0 / m), m

    def _mean_square(self, X, m):
        """Per channel, the sum of squares of the batch's rows (this process's rows X) over m."""
        squares = np.einsum("ij,ij->j", X, X)
        if self.sync is not None:
            squares = self.sync.sums(squares)
        return squares * (1.0 / m)

    def whole_batch(self, *sums):
        """The per-channel ``sums`` of this process's rows, as sums over the whole batch."""
        if self.sync is None:
            return sums
        return np.split(self.sync.sums(np.concatenate(sums)), len(sums))

    def update_running(self, mean, var, m):
        """Fold a batch's mean and biased variance over ``m`` values into the running statistics
        (once per batch: by the process that leads when the batch is split)."""
        if self.sync is not None and not self.sync.leader:
            return
        m_ = self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1 - m_
        rm += m_ * mean
        rv *= 1 - m_
        rv += (m_ * m / max(m - 1, 1)) * var  # running_var keeps the unbiased variance

    def backward(self, dout):
        xhat, inv_std, m = self._cache
        D = self._rows(dout)
        dbeta = _column_sums(D)
        dgamma = np.einsum("ij,ij->j", D, xhat)
        # this process's share: the shares of all replicas add up to the batch's gradient
        self.grads["weight"], self.grads["bias"] = dgamma, dbeta
        scale = self.params["weight"] * inv_std
        wide, r = kernels.wide_channel_rows(D)
        if m is None:  # running statistics: no batch terms
            return self._unrows((wide * np.tile(scale, r)).reshape(D.shape), dout.shape)
        dgamma, dbeta = self.whole_batch(dgamma, dbeta)
        # d/dx of normalising with the batch's own mean and variance:
        # scale * (dout - mean(dout) - xhat * mean(dout * xhat))
        dx = xhat.reshape(wide.shape) * np.tile(dgamma * (1.0 / m), r)
        np.subtract(wide, dx, out=dx)
        dx -= np.tile(dbeta * (1.0 / m), r)
        dx *= np.tile(scale, r)
        return self._unrows(dx.reshape(D.shape), dout.shape)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """Shape: x: (N, num_features) -> out: same. Attributes: weight, bias, running_mean, running_var: (num_features,)."""

    def output_shape(self, in_shape):
        if in_shape[0] != self.num_features:
            raise ValueError(f"BatchNorm1d({self.num_features}) got {in_shape[0]} features")
        return tuple(in_shape)


class BatchNorm2d(_BatchNorm):
    """Shape: x: (N, C, H, W) -> out: same, statistics per channel C. Attributes: (C,) each."""

    def output_shape(self, in_shape):
        if in_shape[0] != self.num_features:
            raise ValueError(f"BatchNorm2d({self.num_features}) got {in_shape[0]} channels")
        return tuple(in_shape)


class Sequential(Module):
    """Layers applied in order; children named "0", "1", … or by the names of an OrderedDict.

    ``Sequential(OrderedDict(conv1=…, bn1=…))`` gives state-dict keys like ``conv1.weight``.
    """

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (dict, OrderedDict)):
            for name, layer in layers[0].items():
                self.add_module(name, layer)
        else:
            for i, layer in enumerate(layers):
                self.add_module(str(i), layer)

    def __iter__(self):
        return iter(self._children.values())

    def __getitem__(self, name):
        return self._children[name] if isinstance(name, str) else list(self._children.values())[name]

    def __len__(self):
        return len(self._children)

    def forward(self, x):
        self.release_caches()
        # what ran, in order: layers and fused groups; backward walks it back
        x, self._ran = run_layers(list(self._children.values()), x)
        return x

    def backward(self, dout):
        for step in reversed(self._ran):
            dout = step.backward(dout)
            if dout is None:  # a first layer that skips its input gradient
                break
        return dout

    def set_input_grad(self, enabled):
        """Whether backward returns the gradient of the input; off saves the first layer's dx GEMM.

        The flag goes to the first layer with parameters; parameter-free layers before it (Flatten)
        are skipped by backward, which then returns None.
        """
        for layer in self._children.values():
            if layer.params:
                layer.needs_input_grad = enabled
                return self
            if layer._children:
                return self  # a block first: keep its input gradient (nothing saved, nothing wrong)
        return self

    def output_shape(self, in_shape):
        shape = tuple(in_shape)
        for layer in self._children.values():
            shape = layer.output_shape(shape)
        return shape

    def output_shapes(self, in_shape):
        """(name, layer, output shape) for each child, in order; raises ValueError where a size drops below 1."""
        shape, rows = tuple(in_shape), []
        for name, layer in self._children.items():
            shape = layer.output_shape(shape)
            if min(shape) < 1:
                raise ValueError(f"layer '{name}' ({type(layer).__name__}) gets input {rows[-1][2] if rows else tuple(in_shape)} "
                                 f"and would output {shape}: the input is too small for this model")
            rows.append((name, layer, shape))
        return rows


def run_layers(layers, x):
    """(output, steps that ran) of ``layers`` applied in order to x, where a step is a layer or a fused
    group of consecutive layers (:class:`PoolFirst`, :class:`ConvBN`) that ran in their place."""
    ran, i = [], 0
    while i < len(layers):
        group = PoolFirst.at(layers, i)
        out = group.forward(x) if group is not None else None
        if out is not None:
            x, steps = out, [group]
        else:
            x, steps = _layer_forward(layers, i, x)
        ran += steps
        i += sum(len(step.layers) if isinstance(step, Fused) else 1 for step in steps)
    return x, ran


def _layer_forward(layers, i, x):
    """(output, steps that ran) of ``layers[i]``. A convolution followed by a pool-first group hands
    its output to that group in pool blocks (``Conv2d.pool_blocks``) and both run; if the group
    declines (a negative BN scale), the output is turned back into (N, C, H, W) for the layers
    after the convolution to run on as usual. Otherwise, in eval mode, a convolution followed by
    a BatchNorm2d runs as one :class:`ConvBN`."""
    layer = layers[i]
    group = PoolFirst.at(layers, i + 1) if isinstance(layer, Conv2d) else None
    pool = group.pool.kernel_size if group is not None else 1
    if pool == 1 or not layer.blocks_for(x.shape, pool):
        folded = ConvBN.at(layers, i) if group is None else None
        if folded is not None:
            return folded.forward(x), [folded]
        return layer.forward(x), [layer]
    layer.pool_blocks = pool
    try:
        blocks = layer.forward(x)
    finally:
        layer.pool_blocks = 1
    out = group.forward(blocks)
    if out is None:
        return kernels.unpool_blocks(blocks, pool), [layer]
    return out, [layer, group]


class Fused:
    """Consecutive layers of a Sequential run as one step (``layers``); each keeps its parameters,
    statistics and gradients."""

    layers = ()


class ConvBN(Fused):
    """Conv2d → BatchNorm2d [→ ReLU] in eval mode (in a Sequential or a Residual's main path), run as one
    convolution with the BatchNorm's affine map folded into its weight and bias (as
    ``torch.nn.utils.fuse_conv_bn_eval``) and the ReLU applied in place on its output: no pass over
    the convolution's output for either. Not where a pool-first group follows the conv (it applies
    the affine map to the pooled quarter of the data already).

    Exact up to rounding: ``scale * (conv(x, w) + b - mean) + beta = conv(x, scale * w) + scale * (b - mean)
    + beta`` per output channel, scale = gamma / sqrt(running_var + eps). resnet_small's eval pass over
    128 images at one thread (three alternating processes each): 46.8-61.6 -> 40.5-42.0 ms.

    A backward after it runs the layers' own forward again first (eval-mode gradients are rare: tests,
    input saliency) and then their backward: the same gradients as without folding.
    """

    def __init__(self, conv, bn, relu=None):
        self.conv, self.bn, self.relu = conv, bn, relu
        self.layers = [m for m in (conv, bn, relu) if m is not None]
        self._cache = None

    @classmethod
    def at(cls, layers, i):
        """The group starting at ``layers[i]`` if that is a Conv2d followed by a BatchNorm2d, both in eval
        mode (with the ReLU after them, if one is), or None."""
        if i + 1 >= len(layers) or not isinstance(layers[i], Conv2d) or type(layers[i + 1]) is not BatchNorm2d:
            return None
        conv, bn = layers[i], layers[i + 1]
        if conv.training or bn.training:
            return None
        relu = layers[i + 2] if i + 2 < len(layers) and type(layers[i + 2]) is ReLU else None
        return cls(conv, bn, relu)

    def forward(self, x):
        """x: (N, C_in, H, W) -> (N, C_out, H_out, W_out)."""
        bn, w, b = self.bn, self.conv.params["weight"], self.conv.params.get("bias")
        scale = bn.params["weight"] / np.sqrt(bn.buffers["running_var"] + bn.eps)
        shift = bn.params["bias"] - bn.buffers["running_mean"] * scale
        if b is not None:
            shift = shift + b * scale
        out = self.conv.forward_with(x, w * scale[:, None, None, None], shift)
        if self.relu is not None:
            np.maximum(out, 0, out=out)
        self._cache = x
        return out

    def backward(self, dout):
        h = self._cache
        for layer in self.layers:
            h = layer.forward(h)
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout


# PoolFirst's backward over pool blocks works through a chunk of samples of about TAP_CHUNK_BYTES per tap at a
# time (see PoolFirst._backward_blocks): SimpleNet's training step 0.26-0.45 ms shorter at one thread (medians of
# 30 alternating pairs, two runs; alone, its first group 4.9 -> 3.8 ms, but in a step the data comes from L3 anyway).
TAP_CHUNK_BYTES = 1 << 18


class PoolFirst(Fused):
    """[BatchNorm2d →] ReLU → MaxPool2d(k, stride k) of a Sequential, run as one step that pools first:
    the BN affine and the ReLU then touch a k*k times smaller array, forward and backward.

    Exact, up to rounding, when every channel's BN scale ``gamma / sqrt(var + eps)`` is > 0: the
    affine map and ReLU are then non-decreasing, so they commute with the max, and a window's first
    maximum is the same before and after them (ties included). Without BatchNorm that always holds.
    :meth:`forward` returns None when it does not (a negative gamma), and the layers run one by one.
    The layers keep their parameters, statistics and gradients; only their ``_cache`` is skipped.

    The input is (N, C, H, W), or, after a convolution told to (``Conv2d.pool_blocks``), its
    (k*k, N, C, H/k, W/k) :func:`numexp.kernels.pool_blocks`: every window tap is then one block of
    long contiguous runs, not strided runs of C values (channels-last) or W/k values (NCHW), and the
    per-tap work gets that much cheaper (SimpleNet's first group backward: 9 -> 4 ms). The gradient
    comes back in the input's layout.
    """

    def __init__(self, bn, relu, pool):
        self.bn, self.relu, self.pool = bn, relu, pool
        self.layers = [m for m in (bn, relu, pool) if m is not None]

    @classmethod
    def at(cls, layers, i):
        """The group starting at ``layers[i]``, or None if none does."""
        if i >= len(layers):
            return None
        bn = layers[i] if type(layers[i]) is BatchNorm2d else None
        j = i + (bn is not None)
        if j + 1 >= len(layers) or type(layers[j]) is not ReLU or type(layers[j + 1]) is not MaxPool2d:
            return None
        pool = layers[j + 1]
        return cls(bn, layers[j], pool) if pool.stride == pool.kernel_size else None

    def forward(self, x):
        """x: (N, C, H, W) or pool blocks -> (N, C, H_out, W_out), or None where the shortcut is not exact."""
        blocked = x.ndim == 5
        rows = None
        if self.bn is not None:  # (M, C); free for channels-last memory
            rows = np.moveaxis(x, 2, -1).reshape(-1, x.shape[2]) if blocked else self.bn._rows(x)
        norm = self._normalisation(rows)
        if norm is not None and not (norm["scale"] > 0).all():
            return None
        if norm is not None and norm["batch"]:
            self.bn.update_running(norm["mean"], norm["var"], norm["m"])
        if blocked:
            pooled = np.maximum(x[0], x[1])  # (N, C, H_out, W_out) in the blocks' memory order
            for tap in x[2:]:
                np.maximum(pooled, tap, out=pooled)
        else:
            pooled = self.pool.forward(x)  # caches (x, pooled): the winners for backward
        z = pooled if norm is None else kernels.channel_affine(pooled, norm["scale"], norm["shift"])
        out = np.maximum(z, 0, out=None if norm is None else z)
        self._cache = (pooled, out, norm, x if blocked else None)
        return out

    def _normalisation(self, rows):
        """The BN as a per-channel affine map: mean, var, inv_std, scale, shift, and whether (over m
        values) they are the batch's own statistics; None without BN. rows: (M, C) of the input."""
        bn = self.bn
        if bn is None:
            return None
        m = None
        if bn.training:
            mean, var, m = bn.batch_mean_var(rows)
        else:
            mean, var = bn.buffers["running_mean"], bn.buffers["running_var"]
        inv_std = 1 / np.sqrt(var + bn.eps)
        scale = bn.params["weight"] * inv_std
        return dict(mean=mean, var=var, inv_std=inv_std, scale=scale, shift=bn.params["bias"] - mean * scale,
                    batch=bn.training, m=m)

    def backward(self, dout):
        pooled, out, norm, blocks = self._cache
        # in the memory order of out, whatever dout's (C order after a Flatten): the rest follows it
        dz = np.empty_like(out)
        np.multiply(dout, out > 0, out=dz)
        if norm is None:
            return self.pool.backward(dz) if blocks is None else self._backward_blocks(blocks, pooled, dz)
        mean, inv_std, scale = norm["mean"], norm["inv_std"], norm["scale"]
        Z = self.bn._rows(dz)
        dbeta = _column_sums(Z)
        # sum of dz * xhat over the pooled positions, xhat = (pooled - mean) * inv_std
        dgamma = (np.einsum("ij,ij->j", Z, self.bn._rows(pooled)) - mean * dbeta) * inv_std
        self.bn.grads["weight"], self.bn.grads["bias"] = dgamma, dbeta  # this process's share
        c1 = c0 = None
        if norm["batch"]:
            dgamma, dbeta = self.bn.whole_batch(dgamma, dbeta)
            # BN with batch statistics: dx = scale * (D - mean(D) - xhat * mean(D * xhat)), D = dz at the
            # winners; the two mean terms are per-channel constants, so dx = c1 * x + c0 + scale * D
            c1 = -scale * inv_std * dgamma * (1.0 / norm["m"])
            c0 = -scale * dbeta * (1.0 / norm["m"]) - c1 * mean
        g = kernels.channel_affine(dz, scale)
        if blocks is not None:
            return self._backward_blocks(blocks, pooled, g, c1, c0)
        x = self.pool._cache[0]
        if c1 is None:
            dx = np.zeros_like(x)
        else:
            dx = np.empty_like(x)
            kernels.channel_affine(x, c1, c0, out=dx)
        self.pool.scatter(g, dx, add=True)
        return dx

    @staticmethod
    def _backward_blocks(blocks, pooled, g, c1=None, c0=None, chunk_bytes=TAP_CHUNK_BYTES):
        """dx as pool blocks, in their memory order: ``c1 * x + c0`` (if given, per channel) plus ``g``
        at each window's first maximum. blocks: (T, N, C, H_out, W_out); pooled, g: (N, C, H_out, W_out).

        Where each tap's memory is sample by sample (after im2col and Winograd convolutions), a chunk of samples
        of about ``chunk_bytes`` a tap at a time, all taps of it before the next: its ``pooled`` and ``g`` stay in
        cache through the taps. Batch-last memory (LeNet-5, SimpleConvNet) is taken whole: a chunk of samples
        there is a strided slice of every run (in chunks SimpleConvNet's group backward took 4.5 ms, torch's 0.7)."""
        dx = np.empty_like(blocks)
        N = blocks.shape[1]
        sample_major = all(a.strides[1] == max(a.strides[1:]) for a in (blocks, g[None]))
        step = max(1, min(N, chunk_bytes // max(1, g[:1].nbytes))) if sample_major else N
        winners = np.empty_like(g[:step]) if c1 is not None else None  # reused by every tap: no temporaries
        affine = kernels.ChannelAffine(c1, c0) if c1 is not None else None
        for n in range(0, N, step):
            part, g_part, d_part = blocks[:, n:n + step], g[n:n + step], dx[:, n:n + step]
            for tap, first, d in zip(part, kernels.first_maxima(part, pooled[n:n + step]), d_part):
                if c1 is None:
                    np.multiply(g_part, first, out=d)
                else:
                    affine(tap, out=d)
                    d += np.multiply(g_part, first, out=winners[:len(g_part)])
        return dx


class Residual(Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Args:
        in_channels, out_channels: channel counts; stride: stride of conv1 (and of the projection).
        projection: use a 1x1 conv + BN shortcut (``downsample``); required when the shape changes.

    Shape:
        x: (N, C_in, H, W) -> out: (N, C_out, H_out, W_out), H_out = (H - 1) // stride + 1
    """

    def __init__(self, in_channels, out_channels, stride=1, projection=None, rng=None):
        super().__init__()
        if projection is None:
            projection = stride != 1 or in_channels != out_channels
        if not projection and (stride != 1 or in_channels != out_channels):
            raise ValueError("Residual without projection needs stride 1 and in_channels == out_channels")
        self.conv1 = self.add_module("conv1", Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, rng=rng))
        self.bn1 = self.add_module("bn1", BatchNorm2d(out_channels))
        self.relu1 = self.add_module("relu1", ReLU())
        self.conv2 = self.add_module("conv2", Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, rng=rng))
        self.bn2 = self.add_module("bn2", BatchNorm2d(out_channels))
        self.main = [self.conv1, self.bn1, self.relu1, self.conv2, self.bn2]
        self.downsample = None
        if projection:
            self.downsample = self.add_module("downsample", Sequential(
                Conv2d(in_channels, out_channels, 1, stride, 0, bias=False, rng=rng), BatchNorm2d(out_channels)))
        self.relu_out = ReLU()

    def forward(self, x):
        h, self._ran = run_layers(self.main, x)
        short = x if self.downsample is None else self.downsample.forward(x)
        return self.relu_out.forward(h + short)

    def backward(self, dout):
        d = self.relu_out.backward(dout)
        dmain = d
        for step in reversed(self._ran):
            dmain = step.backward(dmain)
        dshort = d if self.downsample is None else self.downsample.backward(d)
        return dmain + dshort

    def output_shape(self, in_shape):
        shape = tuple(in_shape)
        for layer in self.main:
            shape = layer.output_shape(shape)
        return shape
