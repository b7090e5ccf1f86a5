"""Numerical gradients by centred differences, for checking backward passes (use float64)."""
import numpy as np


def numerical_gradient(f, x, dout=None, h=1e-5):
    """Centred-difference gradient of ``sum(f() * dout)`` with respect to ``x``, perturbed in place.

    Args:
        f: callable with no arguments that reads ``x`` and returns an array (or a scalar when
            ``dout`` is None).
        x: the array to perturb; restored exactly afterwards.
        dout: upstream gradient with the shape of ``f()``'s output; None for scalar ``f``.
        h: step size.

    Returns:
        Array with the shape of ``x``.
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = np.array(f(), copy=True)  # f may return a view of x (Flatten)
        x[i] = old - h
        minus = np.array(f(), copy=True)
        x[i] = old
        diff = plus - minus
        grad[i] = (np.sum(diff * dout) if dout is not None else diff) / (2 * h)
        it.iternext()
    return grad


def rel_error(a, b):
    """Relative error of ``a`` against ``b``: ``max|a - b| / max(max|a|, max|b|)``.

    Scaled by the largest magnitude rather than elementwise, so entries that are zero up
    to rounding do not turn a correct gradient into a large "relative" error.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(b), initial=0.0), 1e-12)
    return float(np.max(np.abs(a - b), initial=0.0) / scale)
