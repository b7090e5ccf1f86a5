"""numexp.blas: the in-place GEMM taken from NumPy's own OpenBLAS, and its refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from numexp import blas


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-0.01, 1.0), (-0.01, 0.999)])
@pytest.mark.parametrize("layouts", ["C,C", "F,C", "C,F", "F,F"])
def test_gemm_at_b_adds_into_c_like_numpy(dtype, alpha, beta, layouts):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 300)).astype(dtype), rng.standard_normal((64, 257)).astype(dtype)
    a, b = (np.asfortranarray(m) if order == "F" else m for m, order in zip((a, b), layouts.split(",")))
    c = rng.standard_normal((300, 257)).astype(dtype)
    expected = alpha * (a.T.astype(np.float64) @ b) + beta * c
    assert blas.gemm_at_b(c, a, b, alpha, beta), blas.source()
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, expected, rtol=tol, atol=tol)
    assert c.dtype == dtype


@pytest.mark.parametrize("case", ["a-strided-view", "c-column-slice", "mixed-dtypes", "read-only-c"])
def test_gemm_at_b_declines_what_it_cannot_do_without_touching_c(case):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((8, 6)).astype(np.float32)
    c = rng.standard_normal((5, 12)).astype(np.float32)
    target = c[:, :6]
    if case == "a-strided-view":
        a = np.repeat(a, 2, axis=0)[::2]
        target = c[:, :6].copy()
    elif case == "c-column-slice":
        pass
    elif case == "mixed-dtypes":
        a, target = a.astype(np.float64), c[:, :6].copy()
    else:
        target = c[:, :6].copy()
        target.flags.writeable = False
    before = target.copy()
    assert blas.gemm_at_b(target, a, b, -1.0, 1.0) is False
    np.testing.assert_array_equal(target, before)


def test_gemm_at_b_refuses_shapes_that_do_not_multiply():
    a, b, c = (np.zeros(s, np.float32) for s in ((4, 3), (5, 2), (3, 2)))
    with pytest.raises(ValueError, match="do not give"):
        blas.gemm_at_b(c, a, b, 1.0, 1.0)


def test_environment_switch_turns_it_off_and_the_summary_says_so():
    code = ("import json, numpy as np; from numexp import blas, trainer;"
            "c = np.zeros((3, 2), np.float32); a = np.ones((4, 3), np.float32); b = np.ones((4, 2), np.float32);"
            "print(json.dumps([blas.gemm_at_b(c, a, b, 1.0, 0.0), blas.source(), trainer._blas_threads()]))")
    for value, used in (("0", False), ("1", True)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "NUMEXP_DIRECT_BLAS": value}).stdout
        called, source, threads = json.loads(out)
        assert called is used, source
        assert source.startswith("off (NUMEXP_DIRECT_BLAS=0)") if value == "0" else ":" in source
        assert [t["direct_gemm"] for t in threads if t["library"] == "openblas"] == [source]


def test_threads_reads_the_limit_threadpoolctl_sets_on_numpys_openblas():
    """What threadpoolctl reports, under each limit, for the OpenBLAS numexp took as NumPy's; 1 for
    another BLAS. Where OpenBLAS cannot go to two threads, both say so."""
    lib, path = blas._openblas()
    for limit in (1, 2):
        with threadpool_limits(limit, user_api="blas"):
            info = threadpool_info()
            reported = [i["num_threads"] for i in info if lib is not None and i["filepath"] == path]
            assert blas.threads() == (reported[0] if reported else 1), info
            assert blas.threads() <= limit


def test_numpys_openblas_is_chosen_whatever_order_threadpoolctl_lists_them(monkeypatch):
    """SciPy's wheels bring a second OpenBLAS (imported here through scikit-learn), and threadpoolctl
    lists the two in no fixed order: numexp takes the one inside NumPy's installation either way."""
    import threadpoolctl
    from sklearn.datasets import load_digits  # noqa: F401 - loads SciPy and its OpenBLAS

    infos = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    numpys = [i["filepath"] for i in infos if "numpy" in os.path.basename(os.path.dirname(i["filepath"]))]
    if not numpys:
        pytest.skip("NumPy does not bring its own OpenBLAS here")
    for order in (infos, infos[::-1]):
        monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda order=order: list(order))
        assert blas._openblas()[1] == numpys[0]


@pytest.mark.parametrize("core, limit", [("SkylakeX", blas.SMALL_GEMM_MNK), ("SapphireRapids", blas.SMALL_GEMM_MNK),
                                         ("Cooperlake", blas.SMALL_GEMM_MNK), ("Haswell", 0), ("Zen", 0), (None, 0)])
def test_small_gemm_limit_follows_the_openblas_kernels_in_use(core, limit, monkeypatch):
    """Only OpenBLAS's AVX-512 cores have small-matrix kernels; AVX2 ones, and other BLAS, get no pieces."""
    monkeypatch.setattr(blas, "_openblas_info", lambda: None if core is None else {"architecture": core})
    monkeypatch.setattr(blas, "_state", {})  # this process's own answer comes back afterwards
    assert blas.small_gemm_limit() == limit
    monkeypatch.setattr(blas, "_openblas_info", lambda: pytest.fail("asked twice"))
    assert blas.small_gemm_limit() == limit  # remembered


def test_small_gemm_limit_of_this_process_names_its_kernels():
    info = blas._openblas_info()
    core = (info or {}).get("architecture")
    assert blas.small_gemm_limit() == (blas.SMALL_GEMM_MNK if str(core).lower() in blas.SMALL_KERNEL_CORES else 0)
