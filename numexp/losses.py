"""Classification losses: ``loss, dscores = loss_fn(scores, y)``, mean-reduced.

``scores`` is (N, K) float, ``y`` is (N,) integer labels; ``loss`` is a Python float and
``dscores`` has the dtype and shape of ``scores``.
"""
import numpy as np


class CrossEntropy:
    """Softmax followed by cross-entropy, fused (torch ``CrossEntropyLoss``).

    ``loss = mean_i( logsumexp(s_i) - s_i[y_i] )``; ``dscores = (softmax(s) - onehot(y)) / N``.
    The max is subtracted before ``exp`` so large scores never overflow.
    """

    def __call__(self, scores, y):
        N = scores.shape[0]
        shifted = scores - scores.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        sums = e.sum(axis=1, keepdims=True)
        rows = np.arange(N)
        loss = float(np.mean(np.log(sums[:, 0]) - shifted[rows, y]))
        dscores = e / sums
        dscores[rows, y] -= 1
        dscores *= 1.0 / N
        return loss, dscores


class _MultiMargin:
    """Multiclass hinge ``max(0, 1 - s_y + s_j)^p`` over j != y (torch ``MultiMarginLoss(p)``).

    Note:
        As in torch, the sum over classes is divided by the number of classes K, then
        averaged over the batch: ``loss = sum_{i, j != y_i} margin_ij^p / (N * K)``.
        cs231n's ``svm_loss`` divides by N only, so its values are K times larger.
    """

    p = 1

    def __init__(self, margin=1.0):
        self.margin = margin

    def __call__(self, scores, y):
        N, K = scores.shape
        rows = np.arange(N)
        margins = scores - scores[rows, y][:, None] + self.margin
        margins[rows, y] = 0
        np.maximum(margins, 0, out=margins)
        scale = 1.0 / (N * K)
        if self.p == 1:
            loss = float(margins.sum()) * scale
            dscores = (margins > 0).astype(scores.dtype)
        else:
            loss = float(np.vdot(margins, margins)) * scale
            dscores = 2 * margins
        dscores[rows, y] = -dscores.sum(axis=1)
        dscores *= scale
        return loss, dscores


class Hinge(_MultiMargin):
    """L1-SVM: multiclass hinge loss (torch ``MultiMarginLoss(p=1)``)."""

    p = 1


class SquaredHinge(_MultiMargin):
    """L2-SVM: squared multiclass hinge loss (torch ``MultiMarginLoss(p=2)``)."""

    p = 2


LOSSES = {"softmax": CrossEntropy, "svm_l1": Hinge, "svm_l2": SquaredHinge}


def build(name, **options):
    """The loss registered as ``name`` ("softmax", "svm_l1" or "svm_l2")."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**options)
