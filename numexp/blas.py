"""The one GEMM NumPy cannot express, taken from the BLAS NumPy itself links.

``C = alpha * A.T @ B + beta * C`` in place is BLAS's plain ``gemm`` with ``beta``; NumPy's
``matmul`` always writes a fresh product. For SimpleNet's FC1 update (``W -= lr * dout.T @ x``,
W 3072 x 4096) that matters: a fresh product is a 50 MB temporary, or, block by block, an
extra pass over W; through ``gemm`` the update costs no more than the GEMM itself (on the bench
machine 20.5 ms at one thread and 11.1 at two, against 24.6 and 13.7 for NumPy with the best block
size, 28.0 and 16.8 with the 64-row blocks numexp used before).

The library is the OpenBLAS that threadpoolctl finds loaded by NumPy (so ``threadpool_limits``
governs it too), called through ctypes. It is used only after a self-check against
``np.matmul`` on the first call; anything unexpected (another BLAS, a symbol with an unknown
integer width, a wrong result, ``NUMEXP_DIRECT_BLAS=0``) leaves :func:`gemm_at_b` returning
False, and callers fall back to NumPy.
"""
import ctypes
import os

import numpy as np

# cblas entry points by name, with the width of their integer arguments: NumPy's wheels ship
# OpenBLAS built with 64-bit integers and a ``scipy_`` prefix, a system OpenBLAS has the plain names
_SYMBOLS = (("scipy_cblas_{}gemm64_", ctypes.c_int64), ("cblas_{}gemm64_", ctypes.c_int64),
            ("scipy_cblas_{}gemm", ctypes.c_int32), ("cblas_{}gemm", ctypes.c_int32))
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SCALARS = {np.dtype(np.float32): ("s", ctypes.c_float), np.dtype(np.float64): ("d", ctypes.c_double)}

# OpenBLAS cores (openblas_get_corename, lower case) whose kernels include small-matrix GEMMs, and the
# size up to which those take a GEMM (OpenBLAS's sgemm_small_kernel_permit for them: M*N*K <= 100**3)
SMALL_KERNEL_CORES = ("skylakex", "cooperlake", "sapphirerapids")
SMALL_GEMM_MNK = 100 ** 3

_state = {}  # "functions": {dtype: ctypes function}, "source": description; filled on first use


def _openblas_info():
    """threadpoolctl's description of the OpenBLAS NumPy uses, or None."""
    from threadpoolctl import threadpool_info
    libs = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    if not libs:
        return None
    # SciPy's wheels load a second OpenBLAS, and threadpoolctl lists the two in no fixed order: NumPy's
    # own is the one inside its installation (numpy.libs/, numpy/.dylibs/), where there is such a one
    site = os.path.dirname(os.path.dirname(np.__file__))
    libs.sort(key=lambda info: not os.path.relpath(info["filepath"], site).startswith("numpy"))
    return libs[0]


def _openblas():
    """(ctypes library, path) of the OpenBLAS NumPy uses, or (None, reason)."""
    info = _openblas_info()
    if info is None:
        return None, "NumPy's BLAS is not OpenBLAS"
    try:
        return ctypes.CDLL(info["filepath"]), info["filepath"]
    except OSError as err:
        return None, f"cannot load {info['filepath']}: {err}"


def small_gemm_limit():
    """The largest GEMM (M*N*K multiply-adds) that NumPy's OpenBLAS runs on its small-matrix kernels,
    or 0 where it has none.

    OpenBLAS's AVX-512 kernel sets (its SkylakeX, Cooperlake and SapphireRapids cores) multiply
    matrices of at most 100**3 multiply-adds with kernels that skip packing the operands; its AVX2
    (Haswell) kernels, which numexp picks on AMD Zen 4 (:mod:`numexp.kernels_choice`), have no such
    path. The narrow GEMMs of few-channel convolutions are far larger than that and far faster cut
    into pieces below it (:func:`numexp.kernels.matmul_pieces`)."""
    if "small_gemm_limit" not in _state:
        info = _openblas_info()
        core = str((info or {}).get("architecture") or "").lower()
        _state["small_gemm_limit"] = SMALL_GEMM_MNK if core in SMALL_KERNEL_CORES else 0
    return _state["small_gemm_limit"]


def _find_functions():
    """({dtype: cblas gemm function}, "path:symbol") of the OpenBLAS NumPy uses, or ({}, reason)."""
    if os.environ.get("NUMEXP_DIRECT_BLAS", "1") == "0":
        return {}, "off (NUMEXP_DIRECT_BLAS=0)"
    lib, path = _openblas()
    if lib is None:
        return {}, f"off ({path})"
    for pattern, integer in _SYMBOLS:
        functions = {}
        for dtype, (letter, scalar) in _SCALARS.items():
            fn = getattr(lib, pattern.format(letter), None)
            if fn is None:
                break
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, scalar,
                           ctypes.c_void_p, integer, ctypes.c_void_p, integer, scalar, ctypes.c_void_p, integer]
            fn.restype = None
            functions[dtype] = fn
        else:
            return functions, f"{path}:{pattern.format('s')}"
    return {}, "off (no cblas gemm symbol found)"


def _self_check(functions):
    """True if every function computes a small C = alpha * A.T @ B + beta * C as NumPy does."""
    rng = np.random.default_rng(0)
    for dtype in functions:
        a, b, c = (rng.standard_normal(shape).astype(dtype) for shape in ((5, 7), (5, 9), (7, 9)))
        expected = -0.5 * (a.T.astype(np.float64) @ b) + 0.75 * c
        _call(functions[dtype], c, a, b, -0.5, 0.75)
        if not np.allclose(c, expected, rtol=1e-4, atol=1e-5):
            return False
    return True


def _call(fn, c, a, b, alpha, beta):
    """a (K, M) and b (K, N) each C- or Fortran-contiguous (a transposed view), c C-contiguous."""
    k, m = a.shape
    n = b.shape[1]
    trans_a, lda = (_TRANS, m) if a.flags.c_contiguous else (_NO_TRANS, k)
    trans_b, ldb = (_NO_TRANS, n) if b.flags.c_contiguous else (_TRANS, k)
    fn(_ROW_MAJOR, trans_a, trans_b, m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data, ldb,
       beta, c.ctypes.data, n)


def _functions():
    if "functions" not in _state:
        functions, source = _find_functions()
        if functions and not _self_check(functions):
            functions, source = {}, f"off (self-check failed for {source})"
        _state["functions"], _state["source"] = functions, source
    return _state["functions"]


def source():
    """Where :func:`gemm_at_b` gets its GEMM (``"path:symbol"``), or ``"off (reason)"``: for provenance."""
    _functions()
    return _state["source"]


def gemm_at_b(c, a, b, alpha, beta):
    """``c = alpha * a.T @ b + beta * c`` in place, for a (K, M), b (K, N), c (M, N).

    a and b may be transposed views (Fortran-contiguous). Returns False, touching nothing, where the
    direct BLAS call cannot be used (not available, mixed or unsupported dtypes, strided arrays, c not
    C-contiguous); the caller then computes it with NumPy.
    """
    fn = _functions().get(c.dtype)
    if fn is None or not (a.dtype == b.dtype == c.dtype):
        return False
    dense = [m.flags.c_contiguous or m.flags.f_contiguous for m in (a, b)]
    if not (all(dense) and c.flags.c_contiguous and c.flags.writeable):
        return False
    if a.shape[0] != b.shape[0] or c.shape != (a.shape[1], b.shape[1]):
        raise ValueError(f"gemm_at_b: shapes {a.shape}.T @ {b.shape} do not give {c.shape}")
    _call(fn, c, a, b, float(alpha), float(beta))
    return True


def threads():
    """How many threads NumPy's OpenBLAS would run a GEMM on now (its current limit, which
    ``threadpool_limits`` sets), asked in about a microsecond; 1 where it cannot be asked (another BLAS).

    The convolutions pick their unfolding by it: chunks of the unfold multiplied while in cache win on
    one thread and lose on two, where one large GEMM splits better (:class:`numexp.nn.Conv2d`)."""
    if "threads" not in _state:
        lib, _ = _openblas()
        names = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")
        fn = next((getattr(lib, name) for name in names if lib is not None and hasattr(lib, name)), None)
        if fn is not None:
            fn.argtypes, fn.restype = [], ctypes.c_int
        _state["threads"] = fn
    fn = _state["threads"]
    return fn() if fn is not None else 1
