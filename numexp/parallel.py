"""Data parallelism over the CPU cores for small networks: each core runs the whole network on its
slice of the batch, with BLAS on one thread.

A network like LeNet-5 spends a training step in some 150 NumPy calls on small arrays. Two BLAS
threads cannot speed those up (most of them are not GEMMs, and the GEMMs are too small to split
well), but two copies of the network, each on half the batch, can. The copies run in processes, not
threads: a LeNet-5 half-batch step took 3.4-3.9 ms alone and 4.6-5.9 ms with a second thread doing
the other half (the threads queue for the GIL between NumPy's small calls), but 4.0 ms with a second
process doing it.

The first slice runs in the calling process; each other slice runs in a forked child that holds its
own copy of the network (its caches and gradients). The parameters and buffers live in shared memory,
so optimizer steps and loaded state dicts reach every child; a child writes its gradients to shared
memory too, and they are summed into the model's after each backward. Requests and answers travel over
a pipe, their larger arrays through a shared-memory mailbox per direction (see INLINE_BYTES). BatchNorm
layers add up their per-channel sums over the replicas in the middle of a pass (:class:`_LeaderSync`),
so that every slice is normalised with the whole batch's statistics. The sum of the slices' gradients
is then the batch's gradient up to float rounding, and the same for every run with the same thread
count. Dropout (one mask stream) and weights updated inside ``backward``
keep a network in one process.

Networks with a large fully connected head (SimpleNet: 12.72M of its 12.74M weights in FC1 and FC2)
split once more (:class:`TrunkParallel`): the replicas share the batch up to the first Linear layer,
and the head runs here on BLAS threads. A Linear layer reads each weight once per sample, a
convolution hundreds of times: with the batch split, every replica would stream FC1's 50 MB of weights
and write a 50 MB gradient to be summed (a SimpleNet step on half the batch took 70-75 ms against
105 ms on the whole batch at one thread), while two BLAS threads share one pass over them. That
needs idle BLAS threads that sleep soon (:mod:`numexp.blas_idle`). :func:`parallelize` decides.
"""
import builtins
import collections
import json
import mmap
import multiprocessing
import signal
import time

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_limits

from numexp import blas_idle, nn

# layers whose training output draws on a random stream that replicas would have to share
RANDOM_STREAM_LAYERS = (nn.Dropout,)
# how long a replica, or the caller waiting for one, polls for the next message before it sleeps
SPIN_SECONDS = 0.002
# a Sequential whose layers from the first Linear on hold this many parameters keeps them in one
# process on BLAS threads (TrunkParallel): LeNet-5's head (59k) and SimpleConvNet's (433k) train
# faster inside the replicas, SimpleNet's (12.7M) outside
HEAD_PARAMS = 1_000_000
# arrays larger than INLINE_BYTES and up to MAILBOX_BYTES travel through shared memory, one mailbox per
# replica and direction, rather than through the pipe: a pipe moves 64 kB at a time, each a system call and
# a wake-up of the other side, and the bytes were copied four times on the way. LeNet-5's step at two threads
# 3.08-3.13 -> 2.97-3.07 ms (three alternating processes each); SimpleNet's gained less than its noise.
INLINE_BYTES = 1 << 16
MAILBOX_BYTES = 8 << 20


def available():
    """Whether this platform can fork replica processes (POSIX; not Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


def parallelize(model, threads, opt):
    """``(net, layout)``: the network that trains ``model`` on ``threads`` cores, and how it uses them.

    ``net`` is ``model`` itself (BLAS on every thread), a :class:`DataParallel` of it (one replica per
    core, BLAS on one thread each) or, for a large head (:func:`head_split`), a :class:`TrunkParallel`
    (both, one after the other; else the model itself: never replicas of a large head). Layers
    that run in this process only are told to take ``opt``'s update inside their backward (see
    :meth:`numexp.optim.SGD.fuse_into_backward`), and ``opt`` to share the update of a large
    parameter over ``threads`` threads (:meth:`numexp.optim.Optimizer.each_chunk`). ``layout`` is
    what a run records: ``{"replicas", "blas_threads"}`` and, for a split network, ``"head"`` (its
    first layer's name).
    """
    threads = int(threads)
    opt.threads = threads  # every layout leaves the cores idle while the optimizer steps
    if threads > 1 and available():
        split = head_split(model)
        if split is not None and blas_idle.workers_sleep():
            net = TrunkParallel(model, threads, split)
            opt.fuse_into_backward(net.head)
            return net, {"replicas": threads, "blas_threads": threads, "head": split}
        if split is None and can_split(model):
            return DataParallel(model, threads), {"replicas": threads, "blas_threads": 1}
    opt.fuse_into_backward()
    return model, {"replicas": 1, "blas_threads": threads}


def can_split(model):
    """True if no layer draws on a random stream (Dropout) and no layer updates its weights inside
    ``backward`` (a fused optimizer update would race with the other replicas' reads)."""
    return not any(isinstance(m, RANDOM_STREAM_LAYERS) or getattr(m, "fused_update", None) is not None
                   for _, m in model.named_modules())


def head_split(model):
    """The name of the first Linear layer of a Sequential ``model`` when the layers from it on hold at
    least :data:`HEAD_PARAMS` parameters and the layers before it can run data parallel; else None."""
    if not isinstance(model, nn.Sequential):
        return None
    names = list(model._children)
    first = next((i for i, name in enumerate(names) if isinstance(model[name], nn.Linear)), None)
    if not first:  # no Linear layer, or nothing before it to split
        return None
    head_params = sum(model[name].num_params() for name in names[first:])
    trunk_ok = all(can_split(model[name]) for name in names[:first])
    return names[first] if head_params >= HEAD_PARAMS and trunk_ok else None


class ReplicaError(RuntimeError):
    """A replica process died or broke the protocol; the run cannot go on with it."""


class DataParallel:
    """``model`` run on ``replicas`` contiguous slices of each batch at once, the first here and each
    other one in a replica process.

    Used in place of the model for training steps and evaluation: ``net(x)`` gives the scores of
    the whole batch, ``net.backward(dscores)`` leaves the batch's gradients in ``model``'s grads, so
    the optimizer of ``model`` steps as usual. Run it with BLAS on one thread (:func:`parallelize` does).
    Call :meth:`close` when done (the replicas also end when this process does).

    Shape:
        x: (N, ...) -> scores: (N, K); slices of N // replicas samples (the first ones one larger
        when N does not divide), at most N slices.
    """

    def __init__(self, model, replicas, spin_after_forward=True):
        if not can_split(model):
            raise ValueError("DataParallel needs a network without Dropout or fused updates")
        if not available():
            raise RuntimeError("DataParallel needs the 'fork' start method, which this platform lacks")
        self.model = model
        self.state = _SharedArrays(_slots(model, "params") + _slots(model, "buffers"))
        self.state.adopt()  # before forking, so that the children see the same memory
        self.sync = _LeaderSync()
        self._batch_norms = [m for _, m in model.named_modules() if isinstance(m, nn._BatchNorm)]
        self.replicas = [_Replica(model, number, self._batch_norms) for number in range(1, int(replicas))]
        for bn in self._batch_norms:
            bn.sync = self.sync
        self._slices = []
        # whether replicas poll for the backward request after answering a forward one (see _serve)
        self.spin_after_forward = spin_after_forward

    def __call__(self, x):
        self.state.adopt()  # arrays someone put in place of the shared ones: copy them in
        bounds = np.linspace(0, len(x), min(len(self.replicas) + 1, max(len(x), 1)) + 1).astype(int)
        self._slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        training, spin = self.model.training, SPIN_SECONDS if self.spin_after_forward else 0
        return np.concatenate(self._run(lambda replica, part: replica.forward(part, training, spin), x,
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
        for bn in self._batch_norms:
            bn.sync = None

    def _run(self, send, array, here):
        """Send each replica its slice of ``array``, run ``here`` on the first slice meanwhile, and
        collect the replicas' answers in order; the first error (ours or a replica's) is raised after
        every replica has answered, so the next call starts in step."""
        parts = [array[s] for s in self._slices]
        busy = self.replicas[:len(parts) - 1]
        for replica, part in zip(busy, parts[1:]):
            send(replica, part)
        self.sync.replicas = busy
        try:
            outcomes = [_outcome(lambda: here(parts[0]))]
        finally:
            self.sync.replicas = []
        outcomes += [_outcome(replica.result) for replica in busy]
        for ok, value in outcomes:
            if not ok:
                raise value
        return [value for _, value in outcomes]


def _outcome(job):
    """``(True, job())``, or ``(False, the exception)`` to raise once every replica has answered."""
    try:
        return True, job()
    except Exception as err:  # noqa: BLE001 - re-raised by the caller
        return False, err


class TrunkParallel:
    """``model`` (a Sequential) with its layers before ``head`` run as a :class:`DataParallel` trunk
    on ``replicas`` cores, BLAS on one thread each, and the layers from ``head`` on, here, with BLAS
    on the threads the caller set (the trainer: one per core).

    Used like :class:`DataParallel`. The trunk's BatchNorm layers normalise with the whole batch's
    statistics, so the result is the model's up to float rounding.
    """

    def __init__(self, model, replicas, head):
        layers = list(model._children.items())
        split = [name for name, _ in layers].index(head)
        self.model = model
        self.trunk = nn.Sequential(collections.OrderedDict(layers[:split]))
        self.head = nn.Sequential(collections.OrderedDict(layers[split:]))
        # after the trunk's forward the replicas wait through the head: polling would take a core from it
        self.trunk_net = DataParallel(self.trunk, replicas, spin_after_forward=False)
        self._blas = ThreadpoolController().select(user_api="blas")  # ~15 us a switch

    def __call__(self, x):
        with self._blas.limit(limits=1):
            features = self.trunk_net(x)
        return self.head(features)

    def backward(self, dout):
        dfeatures = self.head.backward(dout)
        with self._blas.limit(limits=1):
            return self.trunk_net.backward(dfeatures)

    def train(self, mode=True):
        for part in (self.model, self.trunk, self.head):  # the layers and both containers
            part.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def close(self):
        self.trunk_net.close()


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


class _Sync:
    """Per-channel sums of BatchNorm over the replicas of one batch; ``sums(part)`` is the total."""

    leader = False

    def counted_sums(self, sums, m):
        """``(total sums, total m)`` of this replica's ``sums`` over ``m`` rows (added in float64)."""
        total = self.sums(np.append(sums.astype(np.float64), m))
        return total[:-1].astype(sums.dtype), int(round(total[-1]))


class _LeaderSync(_Sync):
    """The calling process's side: adds the busy replicas' parts to its own, in replica order, and
    sends every replica the total. It also updates the running statistics (``leader``)."""

    leader = True

    def __init__(self):
        self.replicas = []  # those working on the current call: none outside DataParallel's calls

    def sums(self, part):
        parts, delivered = [part], []
        try:
            for replica in self.replicas:
                parts.append(replica.sync_part())
                delivered.append(replica)
        except BaseException:
            for replica in delivered:
                replica.send_total(None)  # release it: its pass fails, and its answer says so
            raise
        total = parts[0]
        for other in parts[1:]:
            total = total + other
        for replica in self.replicas:
            replica.send_total(total)
        return total


class _FollowerSync(_Sync):
    """A replica's side: sends its part over its pipe and waits for the total."""

    def __init__(self, conn, outbox, inbox):
        self.conn, self.outbox, self.inbox = conn, outbox, inbox

    def sums(self, part):
        _send(self.conn, {"op": "sync"}, part, self.outbox)
        _spin_until_readable(self.conn)
        header, total = _receive(self.conn, self.inbox)
        if header.get("op") == "stop":  # closed while this replica waited (the caller was interrupted)
            raise _Stop
        if total is None:
            raise RuntimeError("the batch was abandoned by the calling process")
        return total


class _Stop(Exception):
    """Raised in a replica told to stop in the middle of a pass."""


class _Replica:
    """A forked child process running ``model`` on the slices it is sent, one call at a time.

    Protocol over a pipe, one request and one answer at a time, each one message of a JSON header and
    an array's bytes (:func:`_send`): nothing is pickled. During a training pass the replica also sends
    the partial sums of each BatchNorm layer and waits for their totals (:class:`_LeaderSync`). The
    child writes its gradients into shared memory after a backward; :meth:`add_grads` adds them into
    the model's.
    """

    def __init__(self, model, number, batch_norms):
        self.number = number
        self.grads = _SharedArrays(_slots(model, "params"))
        self._conn, child_end = multiprocessing.Pipe()
        self._to_child, self._to_parent = mmap.mmap(-1, MAILBOX_BYTES), mmap.mmap(-1, MAILBOX_BYTES)
        self._answer = None  # an answer read while a sync part was expected
        context = multiprocessing.get_context("fork")
        mailboxes = (self._to_parent, self._to_child)  # the child's outbox and inbox
        self.process = context.Process(target=_serve, args=(child_end, self._conn, mailboxes, model, self.grads,
                                                            batch_norms),
                                       name=f"numexp-replica-{number}", daemon=True)
        self.process.start()
        child_end.close()

    def forward(self, x, training, spin=SPIN_SECONDS):
        """Ask for the scores of ``x``; ``spin``: seconds to poll for the next request after answering."""
        self._send({"op": "forward", "training": bool(training), "spin": spin}, x)

    def backward(self, dout):
        self._send({"op": "backward"}, dout)

    def result(self):
        """The answer to the last request: an array, or None; the replica's error raised here."""
        header, array = self._answer or self._read()
        self._answer = None
        while header.get("op") == "sync":  # its caller failed before asking for these sums
            self.send_total(None)
            header, array = self._read()
        return self._unpack(header, array)

    def sync_part(self):
        """The replica's part of the current BatchNorm sums; its error if it answered instead."""
        header, array = self._read()
        if header.get("op") == "sync":
            return array
        self._answer = header, array  # for result()
        self._unpack(header, array)
        raise ReplicaError(f"data-parallel replica {self.number} finished its pass without the "
                           f"BatchNorm sums of its slice")

    def send_total(self, total):
        """The total of the current sums, or None to make the replica's pass fail."""
        try:
            _send(self._conn, {"op": "total"}, total, self._to_child)
        except OSError:
            pass  # the replica is gone; result() says so

    def _read(self):
        try:
            _spin_until_readable(self._conn)
            return _receive(self._conn, self._to_parent)
        except (EOFError, OSError):
            raise ReplicaError(f"data-parallel replica {self.number} (pid {self.process.pid}) died "
                               f"(exit code {self.process.exitcode}); run with threads=1 to avoid "
                               f"replicas") from None

    def _unpack(self, header, array):
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
            _send(self._conn, header, array, self._to_child)
        except OSError:
            pass  # the replica is gone; result() says so


def _send(conn, header, array=None, outbox=None):
    """One message: the header's length (4 bytes), the JSON header, then the array's bytes, or none where
    the array went into ``outbox``, this direction's shared memory (see INLINE_BYTES). The receiver copies
    it out before it answers or asks, so one array at a time is ever there."""
    body = b""
    if array is not None:
        array = np.ascontiguousarray(array)
        header.update(shape=list(array.shape), dtype=array.dtype.str)
        if outbox is not None and INLINE_BYTES < array.nbytes <= len(outbox):
            np.copyto(np.frombuffer(outbox, array.dtype, array.size).reshape(array.shape), array)
            header["mailbox"] = True
        else:
            body = memoryview(array).cast("B")
    head = json.dumps(header).encode()
    conn.send_bytes(len(head).to_bytes(4, "little") + head + body)


def _spin_until_readable(conn, seconds=SPIN_SECONDS):
    """Poll ``conn`` for up to ``seconds`` before the caller blocks on it: a process blocked in a read
    is woken by the kernel tens of microseconds after the write (a round trip took 70-130 us here),
    one that polls sees the message at once. Replicas talk every 1-3 ms during training."""
    deadline = time.perf_counter() + seconds
    while not conn.poll() and time.perf_counter() < deadline:
        pass


def _receive(conn, inbox=None):
    """(header, array or None) of one message sent with :func:`_send`, its array read from ``inbox`` if it
    went there; the array is a fresh copy (layers may keep it in their caches and write to it)."""
    message = conn.recv_bytes()
    size = int.from_bytes(message[:4], "little")
    header = json.loads(message[4:4 + size])
    if "shape" not in header:
        return header, None
    shape = header["shape"]
    if header.get("mailbox"):
        return header, np.frombuffer(inbox, header["dtype"], int(np.prod(shape))).reshape(shape).copy()
    return header, np.frombuffer(message, header["dtype"], offset=4 + size).reshape(shape).copy()


def _serve(conn, parent_end, mailboxes, model, grads, batch_norms):
    """The replica process: answer forward and backward requests until told to stop or orphaned."""
    parent_end.close()  # so that the parent's death ends our reads
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # SIGTERM kills us quietly, as before the run's handler (numexp.__main__.stop_on_sigterm) was
    # inherited: a scheduler's SIGTERM to the whole job then gives the run's one line, not our
    # traceback too. Not ignored: multiprocessing ends leftover daemonic children with SIGTERM at exit.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threadpool_limits(1)
    outbox, inbox = mailboxes
    follower = _FollowerSync(conn, outbox, inbox)
    for bn in batch_norms:
        bn.sync = follower
    spin = SPIN_SECONDS
    while True:
        try:
            _spin_until_readable(conn, spin)
            header, array = _receive(conn, inbox)
        except (EOFError, OSError):
            return
        if header["op"] == "stop":
            return
        spin = header.get("spin", SPIN_SECONDS)
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
            _send(conn, {"ok": True}, answer, outbox)
        except _Stop:
            return
        except Exception as err:  # noqa: BLE001 - handed to the parent
            try:
                _send(conn, {"ok": False, "type": type(err).__name__, "message": str(err)})
            except OSError:
                return  # the parent is gone
