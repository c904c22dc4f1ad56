"""The core's build is chosen at import for the CPU (femtogpt/_dispatch.py).

A portable x86-64 install carries the core compiled for x86-64, x86-64-v3 and
x86-64-v4; the best one the CPU runs is loaded as femtogpt._core. Every build
must compute the same model (to float32 rounding: vector widths and FMA change
the last bits), and one the CPU cannot run is never loaded.
"""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import femtogpt
from femtogpt import _cpu, _dispatch
from femtogpt.errors import FemtoGPTError

PORTABLE = ("x86-64", "x86-64-v3", "x86-64-v4")


@pytest.mark.parametrize("level, expected", [(1, "x86-64"), (2, "x86-64"),
                                             (3, "x86-64-v3"), (4, "x86-64-v4")])
def test_choose_takes_the_best_build_the_cpu_runs(level, expected):
    assert _dispatch.choose(PORTABLE, level) == expected
    # A build without v4 on an AVX-512 machine falls to v3, not to the baseline.
    assert _dispatch.choose(("x86-64", "x86-64-v3"), 4) == "x86-64-v3"


def test_choose_single_builds_and_refusals():
    for single in ("native", "plain", "asan"):
        assert _dispatch.choose((single,), 0) == single
        assert _dispatch.choose((single,), 4) == single
    assert _dispatch.choose(PORTABLE, 4, forced="x86-64") == "x86-64"
    assert _dispatch.choose(PORTABLE, 3, forced="x86-64-v3") == "x86-64-v3"
    with pytest.raises(FemtoGPTError, match="cannot run it.*up to x86-64-v3"):
        _dispatch.choose(PORTABLE, 3, forced="x86-64-v4")
    with pytest.raises(FemtoGPTError, match="no such build.*it has: native"):
        _dispatch.choose(("native",), 4, forced="x86-64-v3")
    with pytest.raises(FemtoGPTError, match="no build of femtogpt's core runs"):
        _dispatch.choose(("x86-64-v3", "x86-64-v4"), 2)


def test_the_loaded_core_is_the_chosen_build_everywhere():
    expected = _dispatch.choose(_cpu.BUILT, _cpu.cpu_level(),
                                os.environ.get("FEMTOGPT_CPU") or None)
    assert femtogpt._core.TARGET == expected
    assert femtogpt.build_info()["core"] == expected
    assert sys.modules["femtogpt._core"] is femtogpt._core
    from femtogpt.model import gpt
    from femtogpt.train import run
    assert gpt._core is femtogpt._core and run._core is femtogpt._core


def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="x86-64 levels exist only on x86-64")
def test_cpu_level_agrees_with_the_kernel():
    flags = _cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    v3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    level = _cpu.cpu_level()
    assert (level >= 3) == v3
    assert (level == 4) == v4


# A small model's loss and gradients, computed by whichever build FEMTOGPT_CPU picks.
_PROBE = r"""
import json, sys, numpy as np, femtogpt
from femtogpt import GPT, GPTConfig
out = {"target": femtogpt._core.TARGET}
for bias, gelu in ((True, "tanh"), (False, "exact")):
    model = GPT(GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          bias=bias, gelu=gelu), seed=3)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 37, size=(3, 16)); y = rng.integers(0, 37, size=(3, 16))
    loss = model.loss(x, y)
    model.zero_grad(); model.backward()
    out[gelu] = {"loss": float(loss), "grads": model.grads_flat[::97].tolist()}
print(json.dumps(out))
"""


def _probe(target, cwd):
    # cwd: not the repository, whose femtogpt/ (sources, no compiled modules
    # when the package is installed) would shadow the installed one.
    env = dict(os.environ, FEMTOGPT_CPU=target, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_every_build_this_cpu_runs_computes_the_same_model(tmp_path):
    runnable = [t for t in _cpu.BUILT if _dispatch.LEVELS.get(t, 0) <= _cpu.cpu_level()
                or t not in _dispatch.LEVELS]
    results = {t: _probe(t, tmp_path) for t in runnable}
    for target, result in results.items():
        assert result["target"] == target
    base = results[runnable[0]]
    for target, result in results.items():
        for gelu in ("tanh", "exact"):
            assert result[gelu]["loss"] == pytest.approx(base[gelu]["loss"], rel=1e-5), target
            np.testing.assert_allclose(result[gelu]["grads"], base[gelu]["grads"],
                                       rtol=1e-3, atol=1e-6, err_msg=target)


def test_forcing_a_build_the_cpu_cannot_run_is_refused(tmp_path):
    missing = [t for t in _cpu.BUILT if _dispatch.LEVELS.get(t, 0) > _cpu.cpu_level()]
    target = missing[0] if missing else "x86-64-v9"
    env = dict(os.environ, FEMTOGPT_CPU=target)
    proc = subprocess.run([sys.executable, "-c", "import femtogpt"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"FEMTOGPT_CPU={target}" in proc.stderr
    assert ("cannot run it" if missing else "no such build") in proc.stderr
