"""Data parallelism over the CPU cores for small networks: each core runs the whole network on its
slice of the batch, with BLAS on one thread.

A network like LeNet-5 spends a training step in some 150 NumPy calls on small arrays. Two BLAS
threads cannot speed those up (most of them are not GEMMs, and the GEMMs are too small to split
well), but two copies of the network, each on half the batch, can. The copies run in processes, not
threads: a LeNet-5 half-batch step took 3.4-3.9 ms alone and 4.6-5.9 ms with a second thread doing
the other half (the threads queue for the GIL between NumPy's small calls), but 4.0 ms with a second
process doing it.

It is exact only for networks whose samples do not interact in a training step: no BatchNorm
(batch statistics) and no Dropout (one mask stream). :func:`workers_for` decides. The first slice
runs in the calling process; each other slice runs in a forked child that holds its own copy of the
network (its caches and gradients). The parameters and buffers live in shared memory, so optimizer
steps and loaded state dicts reach every child; a child writes its gradients to shared memory too,
and they are summed into the model's after each backward. Batches and scores travel over a pipe.
The sum of the slices' gradients is the batch's gradient up to float rounding, and the same for
every run with the same thread count.
"""
import builtins
import json
import mmap
import multiprocessing
import signal
import time

import numpy as np
from threadpoolctl import threadpool_limits

from numexp import nn

# layers whose training output for one sample depends on the other samples of the batch, or on a
# random stream that replicas would have to share
SAMPLE_COUPLED = (nn._BatchNorm, nn.Dropout)
# how long a replica, or the caller waiting for one, polls for the next message before it sleeps
SPIN_SECONDS = 0.002


def available():
    """Whether this platform can fork replica processes (POSIX; not Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


def workers_for(model, threads):
    """``(replicas, blas_threads)`` for ``threads`` cores: ``(threads, 1)`` when the model can run data
    parallel, else ``(1, threads)`` (one network, BLAS on every thread)."""
    threads = int(threads)
    if threads > 1 and can_split(model) and available():
        return threads, 1
    return 1, threads


def can_split(model):
    """True if no layer couples the samples of a batch and no layer updates its weights inside
    ``backward`` (a fused optimizer update would race with the other replicas' reads)."""
    return not any(isinstance(m, SAMPLE_COUPLED) or getattr(m, "fused_update", None) is not None
                   for _, m in model.named_modules())


class ReplicaError(RuntimeError):
    """A replica process died or broke the protocol; the run cannot go on with it."""


class DataParallel:
    """``model`` run on ``replicas`` contiguous slices of each batch at once, the first here and each
    other one in a replica process.

    Used in place of the model for training steps and evaluation: ``net(x)`` gives the scores of
    the whole batch, ``net.backward(dscores)`` leaves the batch's gradients in ``model``'s grads, so
    the optimizer of ``model`` steps as usual. Run it with BLAS on one thread (:func:`workers_for`).
    Call :meth:`close` when done (the replicas also end when this process does).

    Shape:
        x: (N, ...) -> scores: (N, K); slices of N // replicas samples (the first ones one larger
        when N does not divide), at most N slices.
    """

    def __init__(self, model, replicas):
        if not can_split(model):
            raise ValueError("DataParallel needs a network without BatchNorm, Dropout or fused updates")
        if not available():
            raise RuntimeError("DataParallel needs the 'fork' start method, which this platform lacks")
        self.model = model
        self.state = _SharedArrays(_slots(model, "params") + _slots(model, "buffers"))
        self.state.adopt()  # before forking, so that the children see the same memory
        self.replicas = [_Replica(model, number) for number in range(1, int(replicas))]
        self._slices = []

    def __call__(self, x):
        self.state.adopt()  # arrays someone put in place of the shared ones: copy them in
        bounds = np.linspace(0, len(x), min(len(self.replicas) + 1, max(len(x), 1)) + 1).astype(int)
        self._slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        training = self.model.training
        return np.concatenate(self._run(lambda replica, part: replica.forward(part, training), x,
                                        lambda part: self.model(part)))

    def backward(self, dout):
        """Backward of each slice at once, then the replicas' gradients added into the model's."""
        dx = self._run(lambda replica, part: replica.backward(part), dout, self.model.backward)
        for replica in self.replicas[:len(self._slices) - 1]:
            replica.add_grads()
        return None if dx[0] is None else np.concatenate(dx)

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def close(self):
        for replica in self.replicas:
            replica.close()
        self.replicas = []

    def _run(self, send, array, here):
        """Send each replica its slice of ``array``, run ``here`` on the first slice meanwhile, and
        collect the replicas' answers in order; the first error (ours or a replica's) is raised after
        every replica has answered, so the next call starts in step."""
        parts = [array[s] for s in self._slices]
        busy = self.replicas[:len(parts) - 1]
        for replica, part in zip(busy, parts[1:]):
            send(replica, part)
        outcomes = []
        for job in [lambda: here(parts[0])] + [replica.result for replica in busy]:
            try:
                outcomes.append((True, job()))
            except Exception as err:  # noqa: BLE001 - re-raised below, once the others have answered
                outcomes.append((False, err))
        for ok, value in outcomes:
            if not ok:
                raise value
        return [value for _, value in outcomes]


def _slots(model, kind):
    """[(module, kind, key)] of every parameter (kind ``"params"``) or buffer (``"buffers"``)."""
    return [(module, kind, key) for _, module in model.named_modules() for key in getattr(module, kind)]


class _SharedArrays:
    """One block of shared memory (anonymous, inherited by forked children) holding an array for each
    (module, kind, key) slot, shaped and typed like the module's array at construction."""

    def __init__(self, slots):
        self.slots = slots
        layout, size = [], 0
        for module, kind, key in slots:
            array = getattr(module, kind)[key]
            size = -(-size // 64) * 64  # cache-line aligned
            layout.append((size, array.shape, array.dtype))
            size += array.nbytes
        self._memory = mmap.mmap(-1, max(size, 1))  # MAP_SHARED | MAP_ANONYMOUS
        self.views = [np.frombuffer(self._memory, dtype, int(np.prod(shape)), offset).reshape(shape)
                      for offset, shape, dtype in layout]

    def adopt(self):
        """Make every slot's module array the shared view, copying the values of any array that is not."""
        for (module, kind, key), view in zip(self.slots, self.views):
            arrays = getattr(module, kind)
            if arrays[key] is not view:
                np.copyto(view, arrays[key])
                arrays[key] = view


class _Replica:
    """A forked child process running ``model`` on the slices it is sent, one call at a time.

    Protocol over a pipe, one request and one answer at a time, each one message of a JSON header and
    an array's bytes (:func:`_send`): nothing is pickled. The child writes its gradients into shared
    memory after a backward; :meth:`add_grads` adds them into the model's.
    """

    def __init__(self, model, number):
        self.number = number
        self.grads = _SharedArrays(_slots(model, "params"))
        self._conn, child_end = multiprocessing.Pipe()
        context = multiprocessing.get_context("fork")
        self.process = context.Process(target=_serve, args=(child_end, self._conn, model, self.grads),
                                       name=f"numexp-replica-{number}", daemon=True)
        self.process.start()
        child_end.close()

    def forward(self, x, training):
        self._send({"op": "forward", "training": bool(training)}, x)

    def backward(self, dout):
        self._send({"op": "backward"}, dout)

    def result(self):
        """The answer to the last request: an array, or None; the replica's error raised here."""
        try:
            _spin_until_readable(self._conn)
            header, array = _receive(self._conn)
        except (EOFError, OSError):
            raise ReplicaError(f"data-parallel replica {self.number} (pid {self.process.pid}) died "
                               f"(exit code {self.process.exitcode}); run with threads=1 to avoid "
                               f"replicas") from None
        if not header["ok"]:
            kind = getattr(builtins, header["type"], None)
            kind = kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError
            raise kind(f"{header['message']} (in data-parallel replica {self.number})")
        return array

    def add_grads(self):
        """Add this replica's gradients of the last backward into the model's."""
        for (module, _, key), grad in zip(self.grads.slots, self.grads.views):
            if key in module.grads:
                module.grads[key] += grad

    def close(self):
        try:
            _send(self._conn, {"op": "stop"})
        except OSError:
            pass  # already gone
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()

    def _send(self, header, array):
        header["errstate"] = np.geterr()  # the caller's np.errstate holds in the replica too
        try:
            _send(self._conn, header, array)
        except OSError:
            pass  # the replica is gone; result() says so


def _send(conn, header, array=None):
    """One message: the header's length (4 bytes), the JSON header, then the array's bytes."""
    if array is not None:
        array = np.ascontiguousarray(array)
        header.update(shape=list(array.shape), dtype=array.dtype.str)
    head = json.dumps(header).encode()
    body = b"" if array is None else memoryview(array).cast("B")
    conn.send_bytes(len(head).to_bytes(4, "little") + head + body)


def _spin_until_readable(conn, seconds=SPIN_SECONDS):
    """Poll ``conn`` for up to ``seconds`` before the caller blocks on it: a process blocked in a read
    is woken by the kernel tens of microseconds after the write (a round trip took 70-130 us here),
    one that polls sees the message at once. Replicas talk every 1-3 ms during training."""
    deadline = time.perf_counter() + seconds
    while not conn.poll() and time.perf_counter() < deadline:
        pass


def _receive(conn):
    """(header, array or None) of one message sent with :func:`_send`; the array is a fresh copy
    (layers may keep it in their caches and write to it)."""
    message = conn.recv_bytes()
    size = int.from_bytes(message[:4], "little")
    header = json.loads(message[4:4 + size])
    if "shape" not in header:
        return header, None
    return header, np.frombuffer(message, header["dtype"], offset=4 + size).reshape(header["shape"]).copy()


def _serve(conn, parent_end, model, grads):
    """The replica process: answer forward and backward requests until told to stop or orphaned."""
    parent_end.close()  # so that the parent's death ends our reads
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threadpool_limits(1)
    while True:
        try:
            _spin_until_readable(conn)
            header, array = _receive(conn)
        except (EOFError, OSError):
            return
        if header["op"] == "stop":
            return
        try:
            with np.errstate(**header["errstate"]):
                if header["op"] == "forward":
                    model.train(header["training"])
                    answer = model(array)
                else:
                    answer = model.backward(array)
                    for (module, _, key), view in zip(grads.slots, grads.views):
                        if key in module.grads:
                            np.copyto(view, module.grads[key])
            _send(conn, {"ok": True}, answer)
        except Exception as err:  # noqa: BLE001 - handed to the parent
            _send(conn, {"ok": False, "type": type(err).__name__, "message": str(err)})
