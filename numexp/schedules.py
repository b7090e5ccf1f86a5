"""Learning-rate schedules: small objects the trainer asks for each epoch's lr.

``lr_at(epoch)`` is a pure function of the 0-based epoch index (the number of finished
epochs), so a resumed run gets the same rates. The trainer sets ``optimizer.lr`` from it at
the start of every epoch and, where ``restores_best(epoch)`` is true, first reloads the best
model so far (the seed's "dynamic" rule).
"""
import math


class Schedule:
    """Base: a constant rate ``lr``."""

    def __init__(self, lr):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = float(lr)

    def lr_at(self, epoch):
        return self.lr

    def restores_best(self, epoch):
        """Whether to reload the best-by-validation model before epoch ``epoch``."""
        return False

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Fixed(Schedule):
    """``lr`` throughout."""


class Step(Schedule):
    """``lr * gamma ** (epoch // step_size)`` (torch ``StepLR``)."""

    def __init__(self, lr, step_size=20, gamma=0.1):
        super().__init__(lr)
        if step_size < 1 or not 0 < gamma <= 1:
            raise ValueError(f"need step_size >= 1 and gamma in (0, 1], got {step_size}, {gamma}")
        self.step_size, self.gamma = int(step_size), float(gamma)

    def lr_at(self, epoch):
        return self.lr * self.gamma ** (epoch // self.step_size)


class ExpDecay(Schedule):
    """``lr * gamma ** epoch`` (torch ``ExponentialLR``)."""

    def __init__(self, lr, gamma=0.95):
        super().__init__(lr)
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.gamma = float(gamma)

    def lr_at(self, epoch):
        return self.lr * self.gamma ** epoch


class Cosine(Schedule):
    """``eta_min + (lr - eta_min) * (1 + cos(pi * epoch / T)) / 2`` with ``T`` = the run's epochs
    (torch ``CosineAnnealingLR`` with ``T_max=T``): ``lr`` in the first epoch, nearly ``eta_min`` in the last."""

    def __init__(self, lr, T, eta_min=0.0):
        super().__init__(lr)
        if T < 1 or not 0 <= eta_min < lr:
            raise ValueError(f"need T >= 1 and 0 <= eta_min < lr, got T={T}, eta_min={eta_min}")
        self.T, self.eta_min = int(T), float(eta_min)

    def lr_at(self, epoch):
        return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T)) / 2


class Dynamic(Schedule):
    """The seed's rule: ``lr / factor ** (epoch // step_size)``, and at each drop
    (epochs ``step_size``, ``2 * step_size``, ...) training resumes from the best model so far.

    With lr 1e-3, step_size 20, factor 10 and 60 epochs: 1e-3, 1e-4, 1e-5 for 20 epochs each.
    """

    def __init__(self, lr, step_size=20, factor=10.0):
        super().__init__(lr)
        if step_size < 1 or not factor >= 1:
            raise ValueError(f"need step_size >= 1 and factor >= 1, got {step_size}, {factor}")
        self.step_size, self.factor = int(step_size), float(factor)

    def lr_at(self, epoch):
        return self.lr / self.factor ** (epoch // self.step_size)

    def restores_best(self, epoch):
        return epoch > 0 and epoch % self.step_size == 0


SCHEDULES = {"fixed": Fixed, "step": Step, "exp_decay": ExpDecay, "cosine": Cosine, "dynamic": Dynamic}


def build(name, lr, epochs, **options):
    """The schedule registered as ``name`` for a run of ``epochs`` epochs starting at ``lr``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if name == "cosine":
        options.setdefault("T", epochs)
    return SCHEDULES[name](lr, **options)
