"""What llama.cpp's backends report about this machine, and which of its CPU buffer types srcr lets it use.

llama.cpp can place weights in "extra" CPU buffer types: CPU_REPACK (weights re-laid out for the
CPU's SIMD kernels; the speed most CPUs rely on) and, on Intel Xeons with AMX when the build was
compiled for them (a native build on such a machine is), AMX. The AMX buffer type crashes today
(SIGSEGV in ggml_backend_amx_mul_mat) when a Q4_0/Q8_0 matrix is multiplied by a batch of a few
hundred tokens on more than one thread, which is every perplexity window. llama.cpp offers one
switch for both (`use_extra_bufts`), so srcr turns the extra buffer types off exactly when the CPU
backend itself lists AMX among them, and keeps them (and the repacking) everywhere else. The
decision is made from the backend's own list, never from a CPU name. SRCR_LLAMA_EXTRA_BUFFERS=on|off
overrides it (docs/gguf.md).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from llama_cpp import llama_cpp as capi

from srcr.base.errors import SrcrError

OVERRIDE_VARIABLE = "SRCR_LLAMA_EXTRA_BUFFERS"
CRASHING_BUFFER_TYPES = frozenset({"AMX"})
_EXTRA_BUFTS_PROC = b"ggml_backend_dev_get_extra_bufts"
_CPU_DEVICE_TYPE = 0  # GGML_BACKEND_DEVICE_TYPE_CPU


@dataclass(frozen=True)
class CpuBufferPlan:
    available: tuple[str, ...]  # the CPU backend's extra buffer types, e.g. ("CPU_REPACK",) or ("AMX", "CPU_REPACK")
    use_extra_buffers: bool
    reason: str


def decide_cpu_buffers(available: tuple[str, ...], override: str | None = None) -> CpuBufferPlan:
    """Keep llama.cpp's extra CPU buffer types unless one of them is known to crash."""
    if override:
        choice = override.strip().lower()
        if choice not in ("on", "off", "auto"):
            raise SrcrError(f"{OVERRIDE_VARIABLE}={override!r} is not on, off or auto; unset it or pick one")
        if choice != "auto":
            return CpuBufferPlan(available, choice == "on", f"{OVERRIDE_VARIABLE}={choice}")
    crashing = sorted(CRASHING_BUFFER_TYPES.intersection(available))
    if crashing:
        return CpuBufferPlan(
            available,
            False,
            f"the CPU backend offers {', '.join(crashing)}, whose matrix multiplication crashes on "
            "multi-token batches; extra buffer types (and weight repacking) are off",
        )
    return CpuBufferPlan(available, True, "no extra buffer type known to crash")


@functools.cache
def cpu_extra_buffer_types() -> tuple[str, ...]:
    """The extra buffer types llama.cpp's CPU backend offers on this machine, by the backend's own names."""
    capi.llama_backend_init()
    try:
        return _names_from_registry()
    except (OSError, AttributeError):
        # A build without the registry entry point: fall back to the compile-time feature list.
        info = capi.llama_print_system_info().decode("utf-8", errors="replace")
        return ("AMX",) if "AMX_INT8 = 1" in info else ()


def _ggml_library(name: str) -> ctypes.CDLL:
    return ctypes.CDLL(str(Path(capi.__file__).parent / "lib" / name))


def _names_from_registry() -> tuple[str, ...]:
    ggml, base = _ggml_library("libggml.so"), _ggml_library("libggml-base.so")
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    names: list[str] = []
    for index in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(index)
        if base.ggml_backend_dev_type(device) != _CPU_DEVICE_TYPE:
            continue
        address = base.ggml_backend_reg_get_proc_address(base.ggml_backend_dev_backend_reg(device), _EXTRA_BUFTS_PROC)
        if not address:
            continue
        extra_bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(device)
        position = 0
        while extra_bufts and extra_bufts[position]:
            names.append(base.ggml_backend_buft_name(extra_bufts[position]).decode("utf-8", errors="replace"))
            position += 1
    return tuple(names)


def plan_cpu_buffers() -> CpuBufferPlan:
    return decide_cpu_buffers(cpu_extra_buffer_types(), os.environ.get(OVERRIDE_VARIABLE))


def gpu_backend_name() -> str:
    """The first non-CPU backend in llama.cpp's system info ("CUDA : ARCHS = ... | CPU : ...")."""
    info = capi.llama_print_system_info().decode("utf-8", errors="replace")
    for section in info.split("|"):
        if ":" in section and (name := section.split(":", 1)[0].strip()) != "CPU":
            return name.lower()
    return "gpu"
