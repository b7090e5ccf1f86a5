"""Which OpenBLAS kernels numexp asks for, decided before NumPy loads OpenBLAS.

OpenBLAS picks its GEMM kernels once, when it is loaded, from the CPU it sees or from
``$OPENBLAS_CORETYPE``. On AMD Zen 4 (family 0x19 with AVX-512) it picks its AVX-512 ("SkylakeX")
kernels, but Zen 4 executes 512-bit instructions as two 256-bit halves, and OpenBLAS's AVX2
("Haswell") kernels measured faster there: float32 GEMM at SimpleNet's FC1 shape 89-92 against
75-78 GFLOP/s on one thread, 159-178 against 134-145 on two (``python -m numexp.bench --coretypes``),
and a SimpleNet training step 98-101 ms against 109-119 ms on one thread.

So numexp sets ``OPENBLAS_CORETYPE=Haswell`` on exactly that CPU, and only when

- the user has not set ``OPENBLAS_CORETYPE`` (any value, even empty, is the user's choice), and
- NumPy is not imported yet (afterwards the variable would have no effect and claiming it would lie).

The choice is one per process and the networks disagree: OpenBLAS's AVX-512 build also has
small-matrix kernels that its AVX2 build lacks, and networks made of tiny GEMMs gain from them.
LeNet-5's per-sample conv1 weight gradient took 0.16-0.22 ms with them against 0.60-0.80 ms, and
a LeNet-5 training step at one thread 5.8-6.3 ms against 6.6-6.7 ms (three alternating fresh
processes each); SimpleConvNet 8.1-9.2 against 9.4-9.9 ms and SimpleNet 109-130 against 105-112 ms
(two each).
numexp picks the kernels of the large GEMMs, which dominate the long runs (SimpleNet on GTSRB);
set ``OPENBLAS_CORETYPE=SkylakeX`` for a process that trains only small networks.

Everywhere else OpenBLAS keeps its own choice. The decision and its reason go into every run's
``summary.json`` (``blas[].kernels_choice``) next to the kernels OpenBLAS reports.
"""
import os
import sys

CHOSEN = "Haswell"
CPUINFO = "/proc/cpuinfo"
# set beside OPENBLAS_CORETYPE when numexp sets it, so that child processes (joblib workers, the
# bench's probes) still record the choice as numexp's, not the user's
MARK = "NUMEXP_SET_OPENBLAS_CORETYPE"
ZEN4_REASON = "AMD Zen 4 runs AVX-512 as two halves; OpenBLAS's AVX2 kernels measured faster"

decision = {"coretype": None, "by": "openblas", "reason": "not decided yet"}


def cpu_description(cpuinfo_text):
    """``(vendor, family, flags)`` of the first processor in a ``/proc/cpuinfo`` text."""
    fields = {}
    for line in cpuinfo_text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    try:
        family = int(fields.get("cpu family", ""))
    except ValueError:
        family = None
    return fields.get("vendor_id"), family, set(fields.get("flags", "").split())


def choose(environ, cpuinfo_text, numpy_loaded):
    """The decision for this process: ``{"coretype": str | None, "by": ..., "reason": ...}``.

    ``coretype`` is the value numexp sets, or None when it sets nothing; ``by`` says whose choice
    the kernels are (``"user"``, ``"numexp"`` or ``"openblas"``)."""
    if "OPENBLAS_CORETYPE" in environ and environ.get(MARK) == environ["OPENBLAS_CORETYPE"]:
        return {"coretype": environ[MARK], "by": "numexp", "reason": ZEN4_REASON + " (set by a parent process)"}
    if "OPENBLAS_CORETYPE" in environ:
        return {"coretype": None, "by": "user",
                "reason": f"OPENBLAS_CORETYPE={environ['OPENBLAS_CORETYPE']} set by the user"}
    vendor, family, flags = cpu_description(cpuinfo_text or "")
    if not (vendor == "AuthenticAMD" and family == 0x19 and "avx512f" in flags):
        return {"coretype": None, "by": "openblas", "reason": "no better kernels known for this CPU"}
    if numpy_loaded:
        return {"coretype": None, "by": "openblas",
                "reason": "NumPy was imported before numexp, too late to choose OpenBLAS kernels"}
    return {"coretype": CHOSEN, "by": "numexp", "reason": ZEN4_REASON}


def read_cpuinfo():
    try:
        with open(CPUINFO) as f:
            return f.read()
    except OSError:  # not Linux: no choice is made
        return ""


def fresh_process_choice():
    """The kernels numexp picks on this CPU in a process where nobody chose and NumPy is not loaded."""
    return choose({}, read_cpuinfo(), numpy_loaded=False)["coretype"]


def apply():
    """Decide for this process and, if numexp chooses, set the variable (child processes inherit it)."""
    decision.update(choose(os.environ, read_cpuinfo(), "numpy" in sys.modules))
    if decision["coretype"]:
        os.environ["OPENBLAS_CORETYPE"] = os.environ[MARK] = decision["coretype"]
    return decision
