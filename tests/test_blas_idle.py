"""numexp shortens OpenBLAS's idle spinning only when nobody chose and NumPy is not loaded yet."""
import json
import os
import subprocess
import sys

import pytest

from numexp import blas_idle


def test_set_when_nobody_chose():
    decision = blas_idle.choose({}, numpy_loaded=False)
    assert decision == {"timeout": blas_idle.CHOSEN, "by": "numexp", "reason": blas_idle.REASON}
    assert blas_idle.workers_sleep(decision)


@pytest.mark.parametrize("value, sleeps", [("4", True), ("20", True), ("28", False), ("", False), ("x", False)])
def test_the_users_value_wins_and_decides_whether_workers_sleep(value, sleeps):
    decision = blas_idle.choose({blas_idle.VARIABLE: value}, numpy_loaded=False)
    assert decision["timeout"] == value and decision["by"] == "user"
    assert blas_idle.workers_sleep(decision) is sleeps


def test_too_late_once_numpy_is_loaded_and_inherited_from_a_parent():
    late = blas_idle.choose({}, numpy_loaded=True)
    assert late["timeout"] is None and "too late" in late["reason"] and not blas_idle.workers_sleep(late)
    inherited = {blas_idle.VARIABLE: "18", blas_idle.MARK: "18"}
    assert blas_idle.choose(inherited, numpy_loaded=True)["by"] == "numexp"


PROBE = ("import json, os; {first}; from numexp import blas_idle, models, optim, parallel; "
         "m = models.build('simplenet', (3, 32, 32), 43); "
         "net, layout = parallel.parallelize(m, 2, optim.build('sgd', m, lr=0.1)); "
         "print(json.dumps([blas_idle.decision, os.environ.get(blas_idle.VARIABLE), layout]))")


@pytest.mark.parametrize("first, split", [("import numexp", True), ("import numpy", False)])
def test_a_fresh_process_splits_simplenet_only_where_numexp_came_first(first, split):
    if not sys.platform.startswith("linux"):
        pytest.skip("the split needs forked replica processes")
    env = {k: v for k, v in os.environ.items() if k not in (blas_idle.VARIABLE, blas_idle.MARK)}
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=env, capture_output=True,
                         text=True, check=True).stdout
    decision, variable, layout = json.loads(out.splitlines()[-1])
    assert (decision["by"], variable) == (("numexp", "18") if split else ("openblas", None))
    assert layout == ({"replicas": 2, "blas_threads": 2, "head": "fc1"} if split
                      else {"replicas": 1, "blas_threads": 2})
