"""Ahead-of-time builds of the native kernels: one extension module per instruction set.

The sources (`attention.cpp`, `layers.cpp`, `vexp.h`) are compiled once per entry of `VARIANTS`
with that instruction set's compiler flags, through torch's own extension builder
(`torch.utils.cpp_extension.BuildExtension`, which also adds torch's headers, libraries and ABI
flags). Nothing built is imported here: a machine without AVX-512 can build the AVX-512 modules
for the machines that have it.

The result is a folder (`lib/` beside the sources, which the wheel carries) with the modules and a
`manifest.json` naming the torch they were compiled against and a digest of what they were
compiled from, so that a loader can tell whether they match.

Used by the wheel's build hook (`hatch_build.py`), by `make setup` and by the loader in this
package; this module imports nothing of the project (the build hook loads it by path).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "attention.cpp", HERE / "layers.cpp")
HEADERS = (HERE / "vexp.h",)  # included by the sources
LIBRARY = HERE / "lib"        # the built modules and their manifest, inside the package
MANIFEST = "manifest.json"

_BASE = ("-O3", "-g0", "-fopenmp")  # -g0: no debug info (it would be 40x the code)
_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512 = (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: the CPU flags (as /proc/cpuinfo names them) it needs, the
    compiler flags that enable them."""

    name: str
    requires: tuple[str, ...]
    cflags: tuple[str, ...]

    @property
    def module(self) -> str:
        """The extension module's name (its file is `<module>.<abi tag>.so`)."""
        return f"reward_kernels_{self.name}"


# Best first: the loader takes the first one the CPU can run. `amx` is `avx512_bf16` with attention's
# bf16 products on AMX tiles (the rest, fp32 included, is the same code).
_BF16 = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
VARIANTS = (
    Variant("amx", (*_BF16, "amx_bf16", "amx_tile"), (*_AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16")),
    Variant("avx512_bf16", _BF16, (*_AVX512, "-mavx512bf16")),
    Variant("avx512", ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"), _AVX512),
    Variant("avx2", ("avx2", "fma", "f16c"), _AVX2),
)


def digest() -> str:
    """What the modules are compiled from: the sources, the headers and this file (the flags)."""
    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS, Path(__file__)):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def torch_build() -> dict:
    """The torch the modules are compiled against: its version (without the local "+cpu" part, which
    the CUDA and CPU builds of one release differ by) and its C++ ABI."""
    import torch

    return {"torch": torch.__version__.split("+")[0], "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)}


def read_manifest(folder: Path = LIBRARY) -> dict | None:
    """The manifest of a built folder, or None if there is none."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def up_to_date(folder: Path = LIBRARY) -> bool:
    """True if `folder` holds every variant, built from these sources against this torch."""
    manifest = read_manifest(folder)
    return (manifest is not None and manifest.get("digest") == digest() and manifest.get("build") == torch_build()
            and all((folder / manifest.get("modules", {}).get(v.name, "?")).is_file() for v in VARIANTS))


def compile_variant(variant: Variant, folder: Path, temp: Path, cflags: tuple[str, ...] | None = None) -> Path:
    """Compile one variant into `folder` (objects in `temp`); returns the module's path.

    Raises:
        RuntimeError and the like from the compiler when it fails (its message says why).
    """
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    flags = list(_BASE + (variant.cflags if cflags is None else cflags))
    extension = CppExtension(variant.module, [str(s) for s in SOURCES], extra_compile_args=flags,
                             extra_link_args=["-fopenmp"])
    distribution = Distribution({"name": variant.module, "ext_modules": [extension],
                                 "cmdclass": {"build_ext": BuildExtension}})
    command = distribution.get_command_obj("build_ext")
    command.build_lib, command.build_temp = str(folder), str(temp)
    command.ensure_finalized()
    command.run()
    [built] = folder.glob(f"{variant.module}.*.so")
    return built


def build_all(folder: Path = LIBRARY, log=print) -> Path:
    """Build every variant into `folder` unless it is already up to date; returns `folder`.

    The folder is replaced whole, and only once every variant is built: a failed build leaves the
    previous one (or nothing), never a mix.
    """
    if up_to_date(folder):
        log(f"native kernels up to date in {folder}")
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lib-", dir=folder.parent))
    try:
        modules = {}
        with tempfile.TemporaryDirectory(prefix="reward-kernels-") as temp:
            for variant in VARIANTS:
                log(f"compiling the native kernels for {variant.name} ({' '.join(variant.cflags)})")
                modules[variant.name] = compile_variant(variant, staging, Path(temp) / variant.name).name
        manifest = {"digest": digest(), "build": torch_build(), "modules": modules,
                    "requires": {v.name: list(v.requires) for v in VARIANTS}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a server running as another user
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
