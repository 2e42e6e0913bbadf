"""The tritonserver installation and its child processes: finding the binary and its backends, the
environment and `sys.path` its Python stubs need, and the plumbing of a child server process."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import sysconfig
from pathlib import Path

from reward_server.supervisor.options import PROJECT_ROOT


class ServerStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with its log tail."""


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launching thread dies (Linux), so a killed
    launcher or test run never leaves a server behind. A thread that starts a server must therefore
    outlive it when the server is stopped on purpose (the watchdog's does: reward_server.supervisor.watchdog)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# What a GPU build of tritonserver logs at every start where there is no GPU: its CUDA memory
# pools and the ensembles' CUDA streams cannot be created. Harmless on a CPU server (nothing of it
# runs on a GPU), alarming to read (E lines).
CUDA_START_NOISE = (b"CudaDriverHelper has not been initialized", b"unable to create stream for ",
                    b"Unable to allocate pinned system memory")


class ConsoleFilter:
    """tritonserver's output as the console shows it on a machine without a GPU: without
    `CUDA_START_NOISE` lines; the first one hidden becomes one line saying why (the log file keeps
    every line).

    Called with each chunk read; returns what to print. Lines are whole: a partial last line waits
    for the next chunk (or `flush`).
    """

    def __init__(self, log_path: Path | str):
        self._note = (f"reward-server: no GPU here, so tritonserver's CUDA start-up errors (memory pools, "
                      f"ensemble streams) are harmless and left out of the console; they are in {log_path}\n").encode()
        self._rest = b""

    def __call__(self, chunk: bytes) -> bytes:
        *lines, self._rest = (self._rest + chunk).split(b"\n")
        kept = []
        for line in lines:
            if any(noise in line for noise in CUDA_START_NOISE):
                kept.append(self._note)
                self._note = b""
            else:
                kept.append(line + b"\n")
        return b"".join(kept)

    def flush(self) -> bytes:
        rest, self._rest = self._rest, b""
        return rest


def tee(pipe, log, console_filter=None) -> None:
    """Copy a server's output to this process's stdout (through `console_filter`, if given) and to its
    log file until it ends. The pipe is always drained (a full pipe would block the server), even
    once the console is gone."""
    console = getattr(sys.stdout, "buffer", sys.stdout)

    def show(data: bytes) -> None:
        nonlocal console
        if console is None or not data:
            return
        try:
            console.write(data if console is not sys.stdout else data.decode(errors="replace"))
            console.flush()
        except (OSError, ValueError):  # this process's stdout was closed
            console = None

    with log:
        for chunk in iter(lambda: pipe.read1(1 << 16), b""):
            log.write(chunk)
            log.flush()
            show(console_filter(chunk) if console_filter else chunk)
        if console_filter:
            show(console_filter.flush())


def find_tritonserver() -> tuple[Path, Path | None]:
    """(tritonserver binary, bundled backend dir or None to use the server's own).

    PATH first (an NGC container), else the server shipped in the nvidia-pytriton wheel.

    Raises:
        FileNotFoundError: neither is present.
    """
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None
    try:
        import pytriton
    except ImportError:
        raise FileNotFoundError("tritonserver is not on PATH and nvidia-pytriton is not installed "
                                "(pip install nvidia-pytriton==0.7.0)") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root / "bin" / "tritonserver", root


def prepare_backends(bundle: Path, dest: Path) -> Path:
    """Lay out backends/python with the stub built for the running Python."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"no Python backend stub for Python {version} in {bundle}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in [stub, *(bundle / "backends" / "python").glob("*")]:
        if source.is_file():
            shutil.copy2(source, python_dir / source.name)
    return dest


def server_environment(bundle: Path | None) -> dict[str, str]:
    """Environment for tritonserver and its Python stubs.

    The interpreter's own libdir goes first on LD_LIBRARY_PATH: otherwise the stub can load
    the system libpython and `import transformers` fails (DESIGN.md).
    """
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    if bundle is not None:
        libs.append(str(bundle.parent.parent / "nvidia_pytriton.libs"))
    libs.append(env.get("LD_LIBRARY_PATH", ""))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


def python_paths_module() -> str:
    """Source of `reward_server_paths`, which each model.py imports first.

    The Python backend stub runs its interpreter isolated (PYTHONPATH is ignored, .pth files of
    added paths are not read), so this module, written next to each runtime model, puts this
    environment's packages (its site directories, and any package directory on this process's
    path) and the project on `sys.path`.
    """
    import site

    packages = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    paths = list(dict.fromkeys([str(PROJECT_ROOT), *site.getsitepackages(), *packages]))
    return ("import sys\n\n"
            f"for _path in reversed({paths!r}):\n"
            "    if _path not in sys.path:\n"
            "        sys.path.insert(0, _path)\n")
