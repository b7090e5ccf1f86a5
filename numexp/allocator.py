"""glibc malloc settings for training loops: keep freed memory for the next step.

A training step allocates the same large temporaries every time (im2col columns, activations,
their gradients: 0.5-20 MB each) and frees them before the next step. By default glibc hands such
blocks back to the kernel (``mmap``/``munmap`` above its threshold, or by trimming the top of the
heap), so every step page-faults them in and zeroes them again: 464 minor faults per SimpleNet step
and 1045-1556 per SimpleConvNet step, 1-4.4 ms of system time per step. A BN-affine-ReLU on a
(64, 32, 16, 16) array took 2.7-3.5 ms with its temporaries faulted in, 0.7 ms without.

So numexp, when imported, asks glibc (``mallopt``) to serve blocks up to 32 MiB (glibc's largest
allowed threshold) from the heap, and to keep up to 512 MiB of free heap instead of trimming it. The
process's peak memory is what it was (the same blocks are reused); what changes is that memory freed
after the peak stays with the process until it exits. Nothing is changed

- when the user has set glibc's own ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
  ``malloc.*`` tunables in ``GLIBC_TUNABLES`` (the user's choice),
- when ``NUMEXP_KEEP_FREED_MEMORY=0``,
- where the C library has no ``mallopt`` (not glibc: macOS, musl).

The decision and its reason go into every run's ``summary.json`` (``allocator``).
"""
import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 512 * 2**20
SWITCH = "NUMEXP_KEEP_FREED_MEMORY"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

decision = {"keep_freed_memory": False, "by": "libc", "reason": "not decided yet"}


def choose(environ, have_mallopt):
    """The decision for this process: ``{"keep_freed_memory": bool, "by": ..., "reason": ...}``;
    ``by`` says whose allocator settings hold (``"user"``, ``"numexp"`` or ``"libc"``)."""
    user = [name for name in USER_SETTINGS if name in environ]
    if "malloc." in environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return {"keep_freed_memory": False, "by": "user", "reason": f"{', '.join(user)} set by the user"}
    if environ.get(SWITCH, "1") == "0":
        return {"keep_freed_memory": False, "by": "user", "reason": f"{SWITCH}=0"}
    if not have_mallopt:
        return {"keep_freed_memory": False, "by": "libc", "reason": "the C library has no mallopt (not glibc)"}
    return {"keep_freed_memory": True, "by": "numexp",
            "reason": f"blocks up to {MMAP_THRESHOLD >> 20} MiB from the heap, up to {TRIM_THRESHOLD >> 20} "
                      f"MiB of free heap kept: a step's temporaries are not page-faulted in every step"}


def _mallopt():
    """glibc's ``mallopt``, or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def apply(environ=os.environ):
    """Decide for this process and set glibc's thresholds if so decided; returns the decision."""
    mallopt = _mallopt()
    chosen = choose(environ, mallopt is not None)
    if chosen["keep_freed_memory"] and not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        chosen = {"keep_freed_memory": False, "by": "libc", "reason": "mallopt refused the thresholds"}
    decision.clear()
    decision.update(chosen)
    return decision
