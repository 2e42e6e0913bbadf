"""Native CPU kernels of the engine, shipped compiled for each instruction set and chosen at load.

`attention.cpp` is the engine's causal attention over packed rows (see its header comment: batch
invariant, causal block skipping, shared-prefix keys read in place); `layers.cpp` the element-wise
work of a decoder layer (RMSNorm with the residual, rotary embedding in place, SiLU x up).

They are compiled ahead of time (`build.py`) once per instruction set, AVX2+FMA, AVX-512,
AVX-512 BF16 and AMX, into `lib/` beside the sources: the wheel carries that folder (its build hook
compiles it) and `make setup` builds it in a checkout. At load the best variant this CPU runs is
taken from its cpuid flags (/proc/cpuinfo), or the one `REWARD_SERVER_KERNELS` names; no compiler
is needed. Only where `lib/` was built from other sources (a developer edited them) is the chosen
variant compiled just in time into the cache, as a development convenience.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from reward_server.pipeline.torch_engine.kernels.build import (HEADERS, LIBRARY, SOURCES, VARIANTS, Variant,
                                                               digest, read_manifest, torch_build)

__all__ = ["ENV", "CACHE", "KernelUnavailable", "KernelRefused", "attention", "choose", "describe", "info",
           "cpu_flags", "SOURCES", "HEADERS", "LIBRARY", "VARIANTS"]

_LOGGER = logging.getLogger(__name__)
ENV = "REWARD_SERVER_KERNELS"  # "auto" (default) or a variant's name: amx, avx512_bf16, avx512, avx2
CACHE = Path(os.environ.get("REWARD_SERVER_CACHE", Path.home() / ".cache" / "reward-server")) / "kernels"
_LOCK = threading.Lock()
_LOADED: dict[str, Any] = {}


class KernelUnavailable(RuntimeError):
    """No native kernel runs here (a CPU without AVX2 and FMA, not x86-64 Linux, a failed development
    build): the engine uses torch's SDPA and logs this reason."""


class KernelRefused(ValueError):
    """A configuration the kernels refuse instead of running: a variant forced by `REWARD_SERVER_KERNELS`
    that this CPU lacks, or shipped kernels compiled against another torch (an ABI mismatch would crash)."""


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose(flags: set[str], forced: str | None = None) -> Variant | None:
    """The variant to load: `forced` (a variant's name) if the CPU has what it needs, else the best
    one it runs; None when it runs none (no AVX2 and FMA).

    Raises:
        KernelRefused: `forced` is unknown or needs flags this CPU lacks.
    """
    names = [v.name for v in VARIANTS]
    if forced in (None, "", "auto"):
        return next((v for v in VARIANTS if set(v.requires) <= flags), None)
    variant = next((v for v in VARIANTS if v.name == forced), None)
    if variant is None:
        raise KernelRefused(f"{ENV}={forced}: no such kernel build; use one of auto, {', '.join(names)}")
    missing = [flag for flag in variant.requires if flag not in flags]
    if missing:
        runs = [v.name for v in VARIANTS if set(v.requires) <= flags]
        raise KernelRefused(f"{ENV}={forced}: this CPU lacks {' '.join(missing)}; it runs "
                            f"{', '.join(runs) if runs else 'none of the native kernels'} (or unset {ENV})")
    return variant


def _import(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pinned `ninja` wheel puts one beside this
    interpreter, which Triton's Python stub does not have on its PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        os.environ["PATH"] = str(Path(sys.prefix) / "bin") + os.pathsep + os.environ.get("PATH", "")


def _development_build(variant: Variant, build: bool) -> Any:
    """The variant compiled just in time from these sources into the cache (a development tree
    whose `lib/` is missing or was built from other sources)."""
    from torch.utils import cpp_extension

    name = f"{variant.module}_{digest()}_{torch_build()['torch'].replace('.', '_')}"
    directory = CACHE / name
    library = directory / f"{name}.so"
    if library.exists():
        return _import(library, name)
    if not build:
        raise KernelUnavailable(f"native kernels not built ({LIBRARY} missing or stale; run "
                                "`python -m reward_server.pipeline.torch_engine.kernels`)")
    _ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    _LOGGER.info("compiling the %s kernels in %s (development: %s is missing or stale; about a minute)",
                 variant.name, directory, LIBRARY)
    try:
        return cpp_extension.load(name=name, sources=[str(source) for source in SOURCES], build_directory=str(directory),
                                  extra_cflags=["-O3", "-g0", "-fopenmp", *variant.cflags], extra_ldflags=["-fopenmp"],
                                  verbose=False)
    except Exception as exc:  # compiler missing, unsupported platform: the engine falls back
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        cause = next((line for line in lines if "error:" in line), lines[-1])  # the compiler's
        raise KernelUnavailable(f"native kernel build failed: {cause.strip()}") from exc


def attention(build: bool = True) -> Any:
    """The native kernels module for this CPU: `packed_attention`, `rms_norm`, `rotary`, `silu_mul`,
    and `lanes`, `key_block`, `amx_key_block`, `bf16_pairs`, `variant`, `origin` describing it.

    The prebuilt build of the chosen variant (`lib/`); where that folder is missing or built from other
    sources, a development build (compiled now when `build` is true).

    Raises:
        KernelUnavailable: no variant runs on this CPU, or a development build is missing or failed.
        KernelRefused: a forced variant this CPU lacks, or shipped kernels built for another torch.
    """
    import torch  # noqa: F401 - the modules link against torch's libraries: load them first

    forced = os.environ.get(ENV, "auto").strip() or "auto"
    with _LOCK:
        variant = choose(cpu_flags(), forced)
        if variant is None:
            raise KernelUnavailable("this CPU lacks avx2, fma or f16c, which every native kernel build needs")
        if variant.name in _LOADED:
            return _LOADED[variant.name]
        manifest = read_manifest()
        if manifest is not None and manifest.get("digest") == digest():
            if manifest.get("build") != torch_build():
                built = manifest.get("build", {}).get("torch", "?")
                raise KernelRefused(f"the native kernels in {LIBRARY} were compiled against torch {built}, this "
                                    f"environment has torch {torch_build()['torch']}: install torch=={built} "
                                    "(the version reward-server pins)")
            module, origin = _import(LIBRARY / manifest["modules"][variant.name], variant.module), "prebuilt"
        else:
            module, origin = _development_build(variant, build), "development build"
        module.variant, module.origin = variant.name, origin
        _LOADED[variant.name] = module
        return module


def info(module: Any) -> dict[str, str]:
    """What attention runs, as labels: {"attention": native|sdpa, "isa": variant or none, "origin": ...}."""
    if module is None:
        return {"attention": "sdpa", "isa": "none", "origin": "none"}
    return {"attention": "native", "isa": module.variant, "origin": module.origin}


def describe(module: Any) -> str:
    """One line naming what the loaded kernels compute with (for logs and benchmarks); None: SDPA."""
    if module is None:
        return "torch SDPA (not the native kernels)"
    tiles = getattr(module, "amx_key_block", module.key_block)
    pairs = (f", bf16 products on AMX tiles (key blocks of {tiles})" if getattr(module, "amx", False) else
             ", bf16 products in AVX-512 BF16 pairs" if getattr(module, "bf16_pairs", False) else "")
    forced = os.environ.get(ENV, "auto").strip() not in ("", "auto")
    how = f"forced by {ENV}" if forced else "chosen from this CPU's flags"
    return (f"{module.variant} build ({module.origin}, {how}): {module.lanes} fp32 lanes, "
            f"key blocks of {module.key_block}{pairs}")


def check() -> int:
    """`--check`: build nothing; 0 if `lib/` holds every variant, compiled from these sources against
    this torch, and the one this CPU runs loads from it (an image build runs this after installing
    the wheel); 1 with the reason otherwise."""
    from reward_server.pipeline.torch_engine.kernels.build import up_to_date

    if not up_to_date(LIBRARY):
        manifest = read_manifest() or {}
        print(f"error: {LIBRARY} does not hold every native kernel build for these sources and torch "
              f"{torch_build()['torch']} (it has: {', '.join(manifest.get('modules', {})) or 'nothing'}, "
              f"built against torch {manifest.get('build', {}).get('torch', '?')})", file=sys.stderr)
        return 1
    try:
        module = attention(build=False)
    except KernelUnavailable as exc:  # a build machine without AVX2: what ships is complete all the same
        print(f"native kernels shipped in {LIBRARY} ({', '.join(v.name for v in VARIANTS)}); none loads on "
              f"this CPU: {exc}")
        return 0
    except KernelRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"native kernels shipped in {LIBRARY} ({', '.join(v.name for v in VARIANTS)}); this CPU loads "
          f"{describe(module)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m reward_server.pipeline.torch_engine.kernels [--check]`: build every variant into `lib/`
    (if it is not up to date), then load the one this CPU runs; with `--check`, see `check`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m reward_server.pipeline.torch_engine.kernels",
                                     description="Build the native kernels for every instruction set, or check them.")
    parser.add_argument("--check", action="store_true",
                        help="build nothing: exit 1 unless the shipped kernels are complete and load here")
    if parser.parse_args(argv).check:
        return check()
    from reward_server.pipeline.torch_engine.kernels.build import build_all

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_all(LIBRARY)
    try:
        module = attention()
    except (KernelUnavailable, KernelRefused) as exc:
        print(f"warning: {exc}; the engine will use torch's attention", file=sys.stderr)
        return 0
    print(f"native kernels ready in {LIBRARY}: {describe(module)}")
    return 0
