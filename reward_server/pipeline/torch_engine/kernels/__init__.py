"""Native CPU kernels of the engine, compiled for the machine they run on, as one extension module.

`attention.cpp` is the engine's causal attention over packed rows (see its header comment: batch
invariant, causal block skipping, shared-prefix keys read in place); `layers.cpp` the element-wise
work of a decoder layer (RMSNorm with the residual, rotary embedding in place, SiLU x up). It is built with
torch.utils.cpp_extension and `-march=native`, so the build is keyed by the source, the torch
version and this CPU's instruction-set flags: a copy of the cache moved to another CPU model is
rebuilt there instead of crashing on an instruction it lacks. `make setup` builds it ahead
(`python -m reward_server.pipeline.torch_engine.kernels`); otherwise the first engine load does (about a minute).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)
SOURCES = (Path(__file__).with_name("attention.cpp"), Path(__file__).with_name("layers.cpp"))
HEADERS = (Path(__file__).with_name("vexp.h"),)  # included by the sources: part of the build's key
CACHE = Path(os.environ.get("REWARD_SERVER_CACHE", Path.home() / ".cache" / "reward-server")) / "kernels"
# the flags that change what -march=native emits for these loops
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16")
_LOCK = threading.Lock()
_LOADED: dict[str, Any] = {}


class KernelUnavailable(RuntimeError):
    """The native kernel cannot be built or loaded here (no compiler, not x86-64 Linux, ...)."""


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_name() -> str:
    """The extension's name: one per (source, torch version, instruction set)."""
    import torch

    flags = sorted(_cpu_flags() & set(_ISA_FLAGS))
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS) + Path(__file__).read_bytes()
                            + torch.__version__.encode()
                            + " ".join(flags).encode())
    return f"reward_attention_{digest.hexdigest()[:12]}"


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pinned `ninja` wheel puts one beside this
    interpreter, which Triton's Python stub does not have on its PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        candidate = Path(sys.prefix) / "bin"
        os.environ["PATH"] = str(candidate) + os.pathsep + os.environ.get("PATH", "")


def attention(build: bool = True) -> Any:
    """The compiled module: `packed_attention`, `rms_norm`, `rotary`, `silu_mul`, `lanes`, `key_block`.

    Loads a previous build from `CACHE` if there is one, else builds it when `build` is true.

    Raises:
        KernelUnavailable: not built and `build` is false, or the build failed (the reason says why).
    """
    import torch  # the extension links against torch's libraries: load them first

    name = build_name()
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        directory = CACHE / name
        library = directory / f"{name}.so"
        if library.exists():
            spec = importlib.util.spec_from_file_location(name, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        elif not build:
            raise KernelUnavailable(f"attention kernel not built ({library} missing; run "
                                    "`python -m reward_server.pipeline.torch_engine.kernels`)")
        else:
            from torch.utils import cpp_extension

            _ninja_on_path()
            directory.mkdir(parents=True, exist_ok=True)
            _LOGGER.info("building the attention kernel for this CPU in %s (once; about a minute)", directory)
            try:
                module = cpp_extension.load(name=name, sources=[str(source) for source in SOURCES], build_directory=str(directory),
                                            extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                            extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as exc:  # compiler missing, unsupported platform: the engine falls back
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                cause = next((line for line in lines if "error:" in line), lines[-1])  # the compiler's
                raise KernelUnavailable(f"attention kernel build failed: {cause.strip()}") from exc
        _LOADED[name] = module
        return module


def describe(module: Any) -> str:
    """One line naming what the loaded kernel computes with (for logs and benchmarks)."""
    pairs = ", bf16 products in AVX-512 BF16 pairs" if getattr(module, "bf16_pairs", False) else ""
    return f"{module.lanes} fp32 lanes, key blocks of {module.key_block}{pairs}"


def main() -> int:
    """`python -m reward_server.pipeline.torch_engine.kernels`: build (or find) the kernels for this machine."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module = attention()
    except KernelUnavailable as exc:
        print(f"warning: {exc}; the engine will use torch's attention", file=sys.stderr)
        return 0
    print(f"attention kernel ready: {CACHE / build_name()} ({describe(module)})")
    return 0
