"""Optimizers with torch's update rules, updating a module's parameters in place.

``opt = SGD(model, lr=0.1)``; after ``model.backward(...)``, ``opt.step()``. State is kept per
dotted parameter name and created on first use. Schedules change ``opt.lr``.

Two kinds of L2 penalty:

- ``weight_decay`` adds ``weight_decay * p`` to the gradient of *every* parameter, as torch does;
- ``reg`` is the seed projects' penalty: ``reg * W`` is added to the gradient of the weights of
  Linear and Conv2d layers only (not biases, not BatchNorm), i.e. the gradient of
  ``0.5 * reg * sum(W**2)``.

Each rule is written once, as the body of one chunk of a parameter (:meth:`Optimizer.each_chunk`):
a megabyte at a time through two reused scratch arrays, shared among threads for large parameters,
so an update makes no parameter-sized temporary and gives the same bits however it is cut.
"""
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from numexp import blas, nn


class Optimizer:
    """Base class: walks the parameters, applies ``reg`` / ``weight_decay``, calls :meth:`update`."""

    def __init__(self, model, lr, weight_decay=0.0, reg=0.0):
        self.model = model
        self.lr = lr
        for name, value in (("weight_decay", weight_decay), ("reg", reg)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.weight_decay, self.reg = weight_decay, reg
        self.state = {}
        self._scratch = [{}]  # per thread: cache-sized temporaries reused across steps (by dtype), not state
        self.steps = 0
        # threads that share the update of a large parameter (numexp.parallel.parallelize sets it to
        # the run's cores: the replicas and BLAS threads are idle while the optimizer steps)
        self.threads = 1

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        if not value > 0:
            raise ValueError(f"learning rate must be > 0, got {value}")
        self._lr = float(value)

    def step(self):
        """Update every parameter from the gradients of the last backward pass."""
        self.steps += 1
        for name, module, key, regularised in self.model.param_slots():
            p, g = module.params[key], module.grads.get(key)
            if g is None:
                continue
            self.update(name, p, g, self.weight_decay + (self.reg if regularised else 0.0))

    def update(self, name, p, g, decay=0.0):
        """Change ``p`` in place given its gradient ``g``, penalised by ``decay * p``."""
        raise NotImplementedError

    def each_chunk(self, body, *arrays):
        """``body(*chunks of arrays, s0, s1)`` for every chunk of ``arrays`` (a parameter, its
        gradient, its state; see :func:`chunks`), with two scratch arrays of the chunk's size.

        A parameter of two chunks or more per thread is cut into :attr:`threads` runs of chunks,
        each run on its own thread with its own scratch arrays: NumPy lets go of the GIL inside each
        call, and every element is computed as it would be on one thread. Adam's update of
        SimpleNet's 12.7M parameters: 23.3 ms on one thread, 14.1 ms on two.
        """
        p = arrays[0]
        runs = min(self.threads, p.size // (2 * CHUNK)) if _contiguous(arrays) else 1
        if runs <= 1:
            for pieces in chunks(arrays, self._scratch[0]):
                body(*pieces)
            return
        while len(self._scratch) < runs:
            self._scratch.append({})
        bounds = [i * (p.size // CHUNK) // runs * CHUNK for i in range(runs)] + [p.size]
        flat = [None if a is None else a.reshape(-1) for a in arrays]

        def run(i):
            part = [None if a is None else a[bounds[i]:bounds[i + 1]] for a in flat]
            for pieces in chunks(part, self._scratch[i]):
                body(*pieces)

        others = [_pool(runs - 1).submit(run, i) for i in range(1, runs)]
        run(0)
        for job in others:
            job.result()

    def fuse_into_backward(self, within=None):
        """Let large Linear layers (of ``within``, a part of the model; default all of it) apply this
        optimizer's update during ``backward`` (see :meth:`SGD.fuse_into_backward`); returns the
        number of layers that do: none by default."""
        return 0


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, torch's rule.

    ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g`` on the first step);
    ``p -= lr * (g + momentum * buf if nesterov else buf)``.
    Sutskever et al. 2013, http://proceedings.mlr.press/v28/sutskever13.html
    """

    def __init__(self, model, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, reg=0.0):
        super().__init__(model, lr, weight_decay, reg)
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening 0")
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov

    def update(self, name, p, g, decay=0.0):
        buf, first = None, False
        if self.momentum:
            buf = self.state.get(name)
            first = buf is None
            if first:
                buf = self.state[name] = np.empty_like(p)

        def body(pc, gc, bc, s0, s1):
            gc = penalised(gc, pc, decay, out=s0)
            if bc is None:
                step = gc
            elif first:
                bc[...] = gc
                step = bc
            else:
                bc *= self.momentum
                bc += np.multiply(gc, 1 - self.dampening, out=s1) if self.dampening else gc
                step = bc
            if self.nesterov:
                step = np.add(gc, np.multiply(bc, self.momentum, out=s1), out=s1)
            pc += np.multiply(step, -self.lr, out=s1)

        self.each_chunk(body, p, g, buf)

    def fuse_into_backward(self, within=None):
        """Plain SGD only: large Linear layers (FC1 of SimpleNet: 12.6M weights) then update their
        weight inside ``backward``, block of rows by block of rows, as
        ``W = (1 - lr*decay) * W - lr * dout.T @ x``, and keep no weight gradient (``step`` skips them).

        The 50 MB weight gradient is then never written and read back; the update is the same
        arithmetic as :meth:`step`'s. Call it once, before training: after it, each ``backward`` of
        such a layer *is* its update, so use it only where every backward is followed by a step.
        """
        if self.momentum:
            return 0
        layers = [m for _, m in (within or self.model).named_modules()
                  if isinstance(m, nn.Linear) and m.params["weight"].size >= CHUNK]
        for layer in layers:
            layer.fused_update = self._update_linear_weight
        return len(layers)

    def _update_linear_weight(self, layer, dout, x):
        """``layer.weight`` (out, in) ``= (1 - lr*decay) * W - lr * dout.T @ x`` for dout (N, out), x (N, in):
        one BLAS gemm with ``beta`` where :mod:`numexp.blas` can call it, else a block of rows at a time."""
        w = layer.params["weight"]
        shrink = 1 - self.lr * (self.weight_decay + self.reg)
        if blas.gemm_at_b(w, dout, x, -self.lr, shrink):
            return
        rows = max(1, FUSED_BLOCK // w.shape[1])
        buf = np.empty((rows, w.shape[1]), dtype=w.dtype)
        scaled = (dout * -self.lr).T  # (out, N): -lr folded into the small operand
        for start in range(0, w.shape[0], rows):
            block = w[start:start + rows]
            part = np.matmul(scaled[start:start + rows], x, out=buf[:len(block)])
            if shrink != 1:
                block *= shrink
            block += part


class Adagrad(Optimizer):
    """Adagrad: ``sum += g**2; p -= lr / (1 + (t-1)*lr_decay) * g / (sqrt(sum) + eps)``.

    Duchi et al. 2011, https://jmlr.org/papers/v12/duchi11a.html
    """

    def __init__(self, model, lr=1e-2, lr_decay=0.0, eps=1e-10, initial_accumulator_value=0.0,
                 weight_decay=0.0, reg=0.0):
        super().__init__(model, lr, weight_decay, reg)
        self.lr_decay, self.eps, self.initial = lr_decay, eps, initial_accumulator_value

    def update(self, name, p, g, decay=0.0):
        acc = self.state.get(name)
        if acc is None:
            acc = self.state[name] = np.full_like(p, self.initial)
        clr = self.lr / (1 + (self.steps - 1) * self.lr_decay)

        def body(pc, gc, ac, s0, s1):
            gc = penalised(gc, pc, decay, out=s0)
            ac += np.multiply(gc, gc, out=s1)
            denom = np.add(np.sqrt(ac, out=s1), self.eps, out=s1)
            pc -= np.divide(np.multiply(gc, clr, out=s0), denom, out=s0)

        self.each_chunk(body, p, g, acc)


class RMSprop(Optimizer):
    """RMSprop, torch's rule: ``v = alpha*v + (1-alpha)*g**2``; ``p -= lr * g / (sqrt(v) + eps)``
    (with momentum: ``buf = momentum*buf + g/(sqrt(v)+eps); p -= lr*buf``).

    Hinton, Lecture 6e, http://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf
    """

    def __init__(self, model, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0, reg=0.0):
        super().__init__(model, lr, weight_decay, reg)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha, self.eps, self.momentum = alpha, eps, momentum

    def update(self, name, p, g, decay=0.0):
        st = self.state.setdefault(name, {})
        if "square_avg" not in st:
            st["square_avg"] = np.zeros_like(p)
        if self.momentum and "momentum_buffer" not in st:
            st["momentum_buffer"] = np.zeros_like(p)

        def body(pc, gc, vc, bc, s0, s1):
            gc = penalised(gc, pc, decay, out=s0)
            vc *= self.alpha
            vc += np.multiply(np.multiply(gc, 1 - self.alpha, out=s1), gc, out=s1)
            step = np.divide(gc, np.add(np.sqrt(vc, out=s1), self.eps, out=s1), out=s0)
            if bc is not None:
                bc *= self.momentum
                bc += step
                step = bc
            pc -= np.multiply(step, self.lr, out=s0)

        self.each_chunk(body, p, g, st["square_avg"], st.get("momentum_buffer"))


class Adam(Optimizer):
    """Adam with bias correction, torch's rule (``weight_decay`` is L2 added to g, not AdamW).

    ``m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g**2;``
    ``p -= lr / (1-b1**t) * m / (sqrt(v) / sqrt(1-b2**t) + eps)``.
    Kingma and Ba 2015, https://arxiv.org/abs/1412.6980
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, reg=0.0):
        super().__init__(model, lr, weight_decay, reg)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
        self.betas, self.eps = (float(b1), float(b2)), eps

    def update(self, name, p, g, decay=0.0):
        st = self.state.setdefault(name, {})
        if not st:
            st["exp_avg"], st["exp_avg_sq"] = np.zeros_like(p), np.zeros_like(p)
        b1, b2 = self.betas
        t = self.steps
        # math.sqrt keeps a Python float: a np.float64 scalar would upcast float32 arrays
        correction2, step_size = math.sqrt(1 - b2 ** t), self.lr / (1 - b1 ** t)

        def body(pc, gc, m, v, s0, s1):
            gc = penalised(gc, pc, decay, out=s0)
            m *= b1
            m += np.multiply(gc, 1 - b1, out=s1)
            v *= b2
            v += np.multiply(np.multiply(gc, 1 - b2, out=s1), gc, out=s1)
            denom = np.add(np.divide(np.sqrt(v, out=s1), correction2, out=s1), self.eps, out=s1)
            pc -= np.divide(np.multiply(m, step_size, out=s0), denom, out=s0)

        self.each_chunk(body, p, g, st["exp_avg"], st["exp_avg_sq"])


CHUNK = 1 << 18  # elements: 1 MB of float32, small enough to stay in cache between the passes
FUSED_BLOCK = 1 << 20  # elements of W per block of the NumPy fused update: 256 rows of FC1 were fastest


def penalised(g, p, decay, out):
    """``g + decay * p`` into ``out``, or ``g`` itself without a penalty."""
    if not decay:
        return g
    return np.add(g, np.multiply(p, decay, out=out), out=out)


def chunks(arrays, scratch):
    """Yield the same CHUNK-sized slice of each of ``arrays`` (None stays None) and two scratch
    arrays of that size, so an update of many in-place steps works in cache, with no temporaries.

    Done whole, each step of Adam's update over FC1's 12.6M weights wrote a 50 MB temporary, past
    glibc's heap threshold, so page-faulted in every step: 70 ms an update. Arrays that are not all
    C-contiguous come whole, with fresh scratch arrays.
    """
    p = arrays[0]
    if not _contiguous(arrays):
        yield (*arrays, np.empty_like(p), np.empty_like(p))
        return
    if p.dtype not in scratch:
        scratch[p.dtype] = np.empty((2, CHUNK), dtype=p.dtype)
    s0, s1 = scratch[p.dtype]
    flat = [None if a is None else a.reshape(-1) for a in arrays]
    for start in range(0, p.size, CHUNK):
        stop = min(start + CHUNK, p.size)
        yield (*(None if a is None else a[start:stop] for a in flat), s0[:stop - start], s1[:stop - start])


def _contiguous(arrays):
    return all(a.flags.c_contiguous for a in arrays if a is not None)


_pools = {}


def _pool(workers):
    """A thread pool of ``workers`` threads, made once per size for the process."""
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="numexp-optim")
    return _pools[workers]


OPTIMIZERS = {
    "sgd": (SGD, {}),
    "momentum": (SGD, {"momentum": 0.9}),
    "nesterov": (SGD, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (Adagrad, {}),
    "rmsprop": (RMSprop, {}),
    "adam": (Adam, {}),
}


def build(name, model, lr, **options):
    """The optimizer registered as ``name`` (see ``OPTIMIZERS``); ``options`` override its defaults."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    cls, defaults = OPTIMIZERS[name]
    return cls(model, lr=lr, **{**defaults, **options})
