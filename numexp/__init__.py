"""numexp: run and report neural-network experiments written from scratch in NumPy."""
# before anything imports NumPy: OpenBLAS reads its kernel choice once, when it is loaded
from numexp import kernels_choice

kernels_choice.apply()
# ... and how long its idle threads spin
from numexp import blas_idle  # noqa: E402

blas_idle.apply()

# glibc: serve a training step's large temporaries from memory the process keeps (no page faults per step)
from numexp import allocator  # noqa: E402

allocator.apply()
