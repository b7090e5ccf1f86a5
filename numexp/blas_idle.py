"""How long OpenBLAS's idle worker threads spin before they sleep, decided before NumPy loads OpenBLAS.

After each threaded call, OpenBLAS's worker threads poll for the next one for 2**28 CPU clock ticks
(``$OPENBLAS_THREAD_TIMEOUT``, default 28: about 0.1 s here) before they go to sleep. A network split
as :class:`numexp.parallel.TrunkParallel` runs its head on two BLAS threads and then, for the rest
of the step, its trunk in two processes on one thread each; the spinning worker took a core from
them: a SimpleNet step took 94-103 ms, against 57-60 ms with timeout 4 (two threads, median steps of
six alternating rounds). With 2**18 ticks (about 0.1 ms) the worker sleeps before the trunk starts,
and back-to-back GEMMs still find it awake: the split step took 54-58 ms in most rounds with 16, 18
or 20, and one network on two BLAS threads stepped in 60-66 ms as with the default (59-65 ms), not
71-74 ms as with 4 (a wake-up for every call).

So numexp sets ``OPENBLAS_THREAD_TIMEOUT=18`` when the user has not set it and NumPy is not imported
yet. :func:`numexp.parallel.parallelize` splits a network that way only where the workers do sleep
soon (:func:`workers_sleep`). The decision goes into every run's ``summary.json``
(``blas[].thread_timeout``).
"""
import os
import sys

CHOSEN = "18"
VARIABLE = "OPENBLAS_THREAD_TIMEOUT"
# the longest timeout (log2 of clock ticks) after which the trunk's processes still get their cores
SLEEPS_SOON = 20
# set beside the variable when numexp sets it, so that child processes still record it as numexp's
MARK = "NUMEXP_SET_OPENBLAS_THREAD_TIMEOUT"
REASON = "idle BLAS threads sleep within ~0.1 ms, so they do not spin beside the data-parallel replicas"

decision = {"timeout": None, "by": "openblas", "reason": "not decided yet"}


def choose(environ, numpy_loaded):
    """The decision for this process: ``{"timeout": str | None, "by": ..., "reason": ...}``; ``timeout``
    is the value in effect (None: OpenBLAS's default), ``by`` whose it is (user, numexp, openblas)."""
    value = environ.get(VARIABLE)
    if value is not None and environ.get(MARK) == value:
        return {"timeout": value, "by": "numexp", "reason": REASON + " (set by a parent process)"}
    if value is not None:
        return {"timeout": value, "by": "user", "reason": f"{VARIABLE}={value} set by the user"}
    if numpy_loaded:
        return {"timeout": None, "by": "openblas",
                "reason": "NumPy was imported before numexp, too late to set the BLAS threads' timeout"}
    return {"timeout": CHOSEN, "by": "numexp", "reason": REASON}


def workers_sleep(chosen=None):
    """Whether idle OpenBLAS workers sleep within about a millisecond under ``chosen`` (default: this
    process's decision)."""
    timeout = (chosen or decision)["timeout"]
    try:
        return timeout is not None and int(timeout) <= SLEEPS_SOON
    except ValueError:
        return False


def apply():
    """Decide for this process and, if numexp chooses, set the variable (child processes inherit it)."""
    decision.update(choose(os.environ, "numpy" in sys.modules))
    if decision["by"] == "numexp":
        os.environ[VARIABLE] = os.environ[MARK] = decision["timeout"]
    return decision
