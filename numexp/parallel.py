"""Data parallelism over the CPU cores for small networks: each core runs the whole network on its
slice of the batch, with BLAS on one thread.

A network like LeNet-5 spends a training step in some 150 NumPy calls on small arrays. Two BLAS
threads cannot speed those up (most of them are not GEMMs, and the GEMMs are too small to split
well), but two copies of the network, each on half the batch in its own Python thread, can: NumPy
releases the GIL inside its loops, so the halves run on both cores at once. On the bench machine
(2 cores), in long runs of steps, a LeNet-5 step took 4.2-4.8 ms this way against 5.2-6.4 ms with
two BLAS threads; in the bench's short rounds after an idle pause the two measured the same.

It is exact only for networks whose samples do not interact in a training step: no BatchNorm
(batch statistics) and no Dropout (one mask stream). :func:`workers_for` decides; the replicas share
the parameter and buffer dicts of the model, keep their own caches and gradients, and the gradients
are summed into the model's after each backward. The sum of the slices' gradients is the batch's
gradient up to float rounding, and the same for every run with the same thread count.
"""
import contextvars
import copy
import threading

import numpy as np

from numexp import nn

# layers whose training output for one sample depends on the other samples of the batch, or on a
# random stream that replicas would have to share
SAMPLE_COUPLED = (nn._BatchNorm, nn.Dropout)


def workers_for(model, threads):
    """``(replicas, blas_threads)`` for ``threads`` cores: ``(threads, 1)`` when the model can run data
    parallel, else ``(1, threads)`` (one network, BLAS on every thread)."""
    threads = int(threads)
    if threads > 1 and can_split(model):
        return threads, 1
    return 1, threads


def can_split(model):
    """True if no layer couples the samples of a batch and no layer updates its weights inside
    ``backward`` (a fused optimizer update would race with the other replicas' reads)."""
    return not any(isinstance(m, SAMPLE_COUPLED) or getattr(m, "fused_update", None) is not None
                   for _, m in model.named_modules())


class DataParallel:
    """``model`` run on ``replicas`` contiguous slices of each batch at once, one thread per slice.

    Used in place of the model for training steps and evaluation: ``net(x)`` gives the scores of
    the whole batch, ``net.backward(dscores)`` leaves the batch's gradients in ``model``'s grads, so
    the optimizer of ``model`` steps as usual. Run it with BLAS on one thread (:func:`workers_for`).

    Shape:
        x: (N, ...) -> scores: (N, K); slices of N // replicas samples (the first ones one larger
        when N does not divide), at most N slices.
    """

    def __init__(self, model, replicas):
        if not can_split(model):
            raise ValueError("DataParallel needs a network without BatchNorm, Dropout or fused updates")
        self.model = model
        self.replicas = [model] + [_replica(model) for _ in range(int(replicas) - 1)]
        self._workers = [_Worker() for _ in self.replicas[1:]]
        self._slices = []

    def __call__(self, x):
        for replica in self.replicas[1:]:  # follow the model's train/eval mode
            if replica.training != self.model.training:
                replica.train(self.model.training)
        bounds = np.linspace(0, len(x), min(len(self.replicas), max(len(x), 1)) + 1).astype(int)
        self._slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        return np.concatenate(self._run(lambda m, s: m(x[s])))

    def backward(self, dout):
        """Backward of each slice at once, then the replicas' gradients added into the model's."""
        dx = self._run(lambda m, s: m.backward(dout[s]))
        for replica in self.replicas[1:len(self._slices)]:
            for (_, ours), (_, theirs) in zip(self.model.named_modules(), replica.named_modules()):
                for key, grad in ours.grads.items():
                    grad += theirs.grads[key]
        return None if dx[0] is None else np.concatenate(dx)

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def close(self):
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def _run(self, fn):
        """fn(replica, slice) for every slice, the first here and the others on the workers, in order."""
        jobs = list(zip(self.replicas, self._slices))
        for worker, job in zip(self._workers, jobs[1:]):
            worker.start(fn, *job)
        try:
            first = fn(*jobs[0])
        finally:
            others = [worker.result() for worker, _ in zip(self._workers, jobs[1:])]
        return [first] + others


class _Worker:
    """One thread that runs one call at a time, handed over with two semaphores: cheaper than a
    ThreadPoolExecutor's futures and queue, which cost as much as a small layer each step. The call
    runs in a copy of the caller's context, so ``np.errstate`` carries over."""

    def __init__(self):
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._job = self._outcome = None
        threading.Thread(target=self._loop, name="numexp-replica", daemon=True).start()

    def start(self, fn, *args):
        self._job = (contextvars.copy_context(), fn, args)
        self._go.release()

    def result(self):
        self._done.acquire()
        ok, value = self._outcome
        if not ok:
            raise value
        return value

    def stop(self):
        self._job = None
        self._go.release()

    def _loop(self):
        while True:
            self._go.acquire()
            if self._job is None:
                return
            context, fn, args = self._job
            try:
                self._outcome = (True, context.run(fn, *args))
            except BaseException as err:  # handed to the caller's thread
                self._outcome = (False, err)
            self._done.release()


def _replica(model):
    """A copy of ``model`` with its own caches and gradients that shares its parameters and buffers
    (the same dicts, so in-place updates and loaded state dicts reach every replica)."""
    replica = copy.deepcopy(model)
    for (_, ours), (_, theirs) in zip(model.named_modules(), replica.named_modules()):
        theirs.params, theirs.buffers, theirs.grads = ours.params, ours.buffers, {}
    return replica
