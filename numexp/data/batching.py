"""Mini-batches and vectorised batch augmentation.

Randomness always comes in as an ``np.random.Generator``; nothing touches numpy's global
state. Augmenters are callables ``(xb, rng) -> new array`` on normalised (N, C, H, W)
batches and never loop over samples.
"""
import numpy as np


def batches(x, y, batch_size, rng=None, shuffle=True, augment=None, drop_last=False):
    """Yield ``(xb, yb)`` mini-batches covering one epoch.

    Args:
        x: (N, ...) inputs; y: (N,) labels.
        batch_size: samples per batch; the last batch may be smaller unless ``drop_last``.
        rng: ``np.random.Generator`` for the epoch's permutation and the augmenter; None
            makes a fresh, unseeded one (not reproducible).
        shuffle: visit samples in a new random permutation (drawn once per call, i.e. per epoch).
        augment: None or ``augment(xb, rng) -> xb``, e.g. :class:`RandomCrop`.
        drop_last: skip the final incomplete batch.

    Shape:
        xb: (B, ...) and yb: (B,), always new arrays (never views of x, y).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    batch_size = int(batch_size)
    rng = np.random.default_rng(rng)
    order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        yield (xb if augment is None else augment(xb, rng)), yb


class RandomCrop:
    """Zero-pad each side by ``padding``, then crop a random H x W window per sample.

    Unlike torch's ``RandomCrop(size, padding)`` the crop size is the input size. The
    padding value 0 is the training mean, since batches are already normalised. All crops
    come from one padded copy by fancy indexing.

    Shape:
        xb: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, padding=4):
        if int(padding) < 0:
            raise ValueError(f"padding must be >= 0, got {padding!r}")
        self.padding = int(padding)

    def __call__(self, xb, rng):
        p = self.padding
        if p == 0:
            return xb.copy()
        n, _, h, w = xb.shape
        padded = np.pad(xb, ((0, 0), (0, 0), (p, p), (p, p)))
        top = rng.integers(0, 2 * p + 1, size=n)
        left = rng.integers(0, 2 * p + 1, size=n)
        rows = (top[:, None] + np.arange(h))[:, None, :, None]
        cols = (left[:, None] + np.arange(w))[:, None, None, :]
        return padded[np.arange(n)[:, None, None, None], np.arange(xb.shape[1])[None, :, None, None], rows, cols]

    def __repr__(self):
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each sample left-right with probability ``p``.

    Not for traffic signs: flipping turns "Keep left" into "Keep right" and mirrors
    arrows and text, so the label would be wrong.

    Shape:
        xb: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, p=0.5):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, xb, rng):
        flip = rng.random(len(xb)) < self.p
        return np.where(flip[:, None, None, None], xb[..., ::-1], xb)

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply augmenters in order, each with the same generator."""

    def __init__(self, augmenters):
        self.augmenters = list(augmenters)

    def __call__(self, xb, rng):
        for augment in self.augmenters:
            xb = augment(xb, rng)
        return xb

    def __repr__(self):
        return f"Compose({self.augmenters})"


AUGMENTERS = {"crop": RandomCrop, "flip": RandomHorizontalFlip}


def make_augment(names, padding=4):
    """Augmenter from config names: ``["crop", "flip"]`` -> Compose; empty/None -> None.

    Args:
        names: subset of ``AUGMENTERS`` ("crop": :class:`RandomCrop` (``padding``), "flip":
            :class:`RandomHorizontalFlip` -- not for traffic signs).
    """
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in AUGMENTERS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {sorted(AUGMENTERS)}")
    if not names:
        return None
    return Compose([RandomCrop(padding) if n == "crop" else AUGMENTERS[n]() for n in names])
