"""Load the fastest build of the core that this CPU runs.

setup.py compiles the same core (_core.pyx) for several instruction sets; the
kernels are auto-vectorised loops, so each build is the whole module, compiled
with another -march. This picks one before anything imports femtogpt._core and
registers it under that name, so the rest of femtogpt never knows which it got.

    FEMTOGPT_CPU=x86-64      force the baseline (or x86-64-v3, x86-64-v4)
    FEMTOGPT_BF16_PATH=portable   force the bf16 GEMM's path (or avx512bf16, amx;
                             default auto: the best this CPU runs), for tests
                             and benchmarks; _core.set_bf16_path() does the same
    FEMTOGPT_INT8_PATH=portable   force the int8 (q8) GEMM's path (or vnni; default
                             auto), the same way; _core.set_int8_path()

A build the CPU cannot run is never loaded (it would stop the process with an
illegal instruction): forcing one is refused with the reason.
"""
import importlib
import os
import sys

from . import _cpu
from .errors import FemtoGPTError

# The x86-64 level each portable build needs (femtogpt/_cpu.pyx: cpu_level()).
LEVELS = {"x86-64": 1, "x86-64-v3": 3, "x86-64-v4": 4}
MODULES = {"x86-64": "_core", "x86-64-v3": "_core_x86_64_v3",
           "x86-64-v4": "_core_x86_64_v4"}


def level_name(level):
    return {0: "no x86-64 level (another architecture)", 1: "x86-64", 2: "x86-64-v2",
            3: "x86-64-v3", 4: "x86-64-v4"}[level]


def choose(built, cpu_level, forced=None):
    """The target to load, of the targets `built`, on a CPU of `cpu_level`.

    A single build (native, plain, asan) is the only choice. Of a portable
    build's targets, the highest level the CPU runs; `forced` (FEMTOGPT_CPU)
    picks one instead, if it was built and the CPU runs it.
    """
    if forced:
        if forced not in built:
            raise FemtoGPTError(f"FEMTOGPT_CPU={forced}: this install has no such build of "
                                f"the core (it has: {', '.join(built)})")
        if LEVELS.get(forced, 0) > cpu_level:
            raise FemtoGPTError(f"FEMTOGPT_CPU={forced}: this CPU cannot run it (it runs "
                                f"up to {level_name(cpu_level)})")
        return forced
    if len(built) == 1:
        return built[0]
    runnable = [t for t in built if LEVELS.get(t, 99) <= cpu_level]
    if not runnable:
        raise FemtoGPTError(f"no build of femtogpt's core runs on this CPU "
                            f"({level_name(cpu_level)}; built: {', '.join(built)})")
    return max(runnable, key=LEVELS.__getitem__)


def load_core():
    """Import the chosen build and make it femtogpt._core."""
    target = choose(_cpu.BUILT, _cpu.cpu_level(), os.environ.get("FEMTOGPT_CPU") or None)
    name = f"{__package__}.{MODULES.get(target, '_core')}"
    module = importlib.import_module(name)
    if module.TARGET != target:
        raise FemtoGPTError(f"{module.__file__} was built for {module.TARGET}, not "
                            f"{target}: the compiled modules come from different builds; "
                            f"reinstall femtogpt")
    sys.modules[f"{__package__}._core"] = module
    path = os.environ.get("FEMTOGPT_BF16_PATH") or None
    if path:
        try:
            module.set_bf16_path(path)
        except ValueError as err:
            raise FemtoGPTError(f"FEMTOGPT_BF16_PATH={path}: {err}") from None
    path = os.environ.get("FEMTOGPT_INT8_PATH") or None
    if path:
        try:
            module.set_int8_path(path)
        except ValueError as err:
            raise FemtoGPTError(f"FEMTOGPT_INT8_PATH={path}: {err}") from None
    return module


def build_info():
    """Which build of the core runs, of those installed, what the CPU runs, and
    the paths bf16 and int8 products take (and the paths this CPU has)."""
    from . import _core
    return {"core": _core.TARGET, "built": list(_cpu.BUILT),
            "cpu": level_name(_cpu.cpu_level()), "bf16": _core.bf16_path(),
            "bf16_available": _core.bf16_paths_available(), "int8": _core.int8_path(),
            "int8_available": _core.int8_paths_available()}
