"""numexp picks OpenBLAS's AVX2 kernels on AMD Zen 4 only, never over the user's choice, never too late."""
import json
import os
import subprocess
import sys

import pytest

from numexp import kernels_choice

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
flags\t\t: fpu sse avx2 fma avx512f avx512bw

processor\t: 1
vendor_id\t: GenuineIntel
"""
ZEN3 = ZEN4.replace(" avx512f avx512bw", "")
ZEN5 = ZEN4.replace("cpu family\t: 25", "cpu family\t: 26")
INTEL_AVX512 = ZEN4.replace("AuthenticAMD", "GenuineIntel").replace("cpu family\t: 25", "cpu family\t: 6")


def test_zen4_gets_the_avx2_kernels_when_nobody_chose():
    decision = kernels_choice.choose({}, ZEN4, numpy_loaded=False)
    assert decision["coretype"] == "Haswell" and decision["by"] == "numexp"
    assert "Zen 4" in decision["reason"]


@pytest.mark.parametrize("cpuinfo", [ZEN3, ZEN5, INTEL_AVX512, "", "garbage without colons"])
def test_other_cpus_keep_openblas_own_choice(cpuinfo):
    decision = kernels_choice.choose({}, cpuinfo, numpy_loaded=False)
    assert decision["coretype"] is None and decision["by"] == "openblas"


@pytest.mark.parametrize("value", ["SkylakeX", "Zen", ""])
def test_the_users_variable_wins_even_when_empty(value):
    decision = kernels_choice.choose({"OPENBLAS_CORETYPE": value}, ZEN4, numpy_loaded=False)
    assert decision["coretype"] is None and decision["by"] == "user"
    assert f"OPENBLAS_CORETYPE={value} " in decision["reason"]


def test_a_child_process_inherits_numexps_choice_as_numexps():
    inherited = {"OPENBLAS_CORETYPE": "Haswell", kernels_choice.MARK: "Haswell"}
    decision = kernels_choice.choose(inherited, "", numpy_loaded=True)
    assert decision["coretype"] == "Haswell" and decision["by"] == "numexp" and "parent" in decision["reason"]
    changed = {**inherited, "OPENBLAS_CORETYPE": "SkylakeX"}
    assert kernels_choice.choose(changed, ZEN4, numpy_loaded=False)["by"] == "user"


def test_no_claim_once_numpy_has_loaded_openblas():
    decision = kernels_choice.choose({}, ZEN4, numpy_loaded=True)
    assert decision["coretype"] is None and "too late" in decision["reason"]


def test_first_processor_block_is_read():
    assert kernels_choice.cpu_description(ZEN4)[:2] == ("AuthenticAMD", 25)
    assert "avx512f" in kernels_choice.cpu_description(ZEN4)[2]


PROBE = ("import json, sys; {first}; from threadpoolctl import threadpool_info; from numexp import trainer; "
         "print(json.dumps([b for b in trainer._blas_threads() if b['library'] == 'openblas']))")


def _openblas_in_fresh_process(first, coretype=None):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", kernels_choice.MARK)}
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=env, capture_output=True,
                         text=True, check=True).stdout
    (openblas,) = json.loads(out)
    return openblas


def test_the_summary_records_the_kernels_and_whose_choice_they_are():
    """In a fresh process: importing numexp first decides; the kernels OpenBLAS reports match the claim."""
    openblas = _openblas_in_fresh_process("import numexp")
    choice = openblas["kernels_choice"]
    assert choice["by"] in ("numexp", "openblas")
    if kernels_choice.fresh_process_choice():
        assert choice == {**choice, "coretype": "Haswell", "by": "numexp"}
        assert openblas["architecture"] == "Haswell"
    user = _openblas_in_fresh_process("import numexp", coretype="SkylakeX")
    assert user["kernels_choice"]["by"] == "user" and user["architecture"] == "SkylakeX"
    late = _openblas_in_fresh_process("import numpy; import numexp")
    assert late["kernels_choice"]["coretype"] is None
    if kernels_choice.fresh_process_choice():
        assert "too late" in late["kernels_choice"]["reason"] and late["architecture"] != "Haswell"
