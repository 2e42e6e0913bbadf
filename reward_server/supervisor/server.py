"""Run a real tritonserver on a checkpoint: render the repository, start the process (or one per
MPI rank), wait until it is ready, drain and stop it; the watchdog restarts it when it dies."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from reward_server.pipeline import settings
from reward_server.pipeline.drain import DrainState, read_metrics, settle_time_from_metrics
from reward_server.pipeline.torch_engine import kernels
from reward_server.supervisor import engines
from reward_server.supervisor.demo_checkpoint import ensure_demo_checkpoint
from reward_server.supervisor.mpi import WORKER_FLAGS, find_mpirun, mpirun_command, ranks
from reward_server.supervisor.options import ServeOptions
from reward_server.supervisor.ports import free_ports
from reward_server.supervisor.repository import drain_dir, model_config, render_repository
from reward_server.supervisor.trtllm_engine import check_host, gpu_count, open_engine
from reward_server.supervisor.tritonserver import (ConsoleFilter, ServerStartError, die_with_parent, find_tritonserver,
                                                   prepare_backends, server_environment, tee)
from reward_server.supervisor.watchdog import Watchdog

_LOGGER = logging.getLogger(__name__)

# APIs a scoring client never needs; restricted because the bundled 2.51 server predates the
# Python-backend shared-memory fixes (DESIGN.md). Calls need this header with the admin token.
RESTRICTED_APIS = "shared-memory,model-repository,logging,trace"
ADMIN_HEADER = "reward-server-admin"


def _shm_prefix() -> str:
    return f"reward{os.getpid()}x{secrets.token_hex(3)}"


class TritonServer:
    """A tritonserver process serving the reward ensembles; a context manager.

    Example:
        with TritonServer(ServeOptions(checkpoint="ckpt")) as server:
            print(server.grpc_url)
    """

    def __init__(self, options: ServeOptions | None = None):
        self.options = options or ServeOptions()
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.checkpoint: Path | None = None
        self.process_model = False  # a process reward model: responses are scored step by step
        self._gpus = gpu_count()  # none: a CPU server (no pinned memory pool, no CUDA noise on the console)
        self.serving = None  # the opened engine directory, with --engine tensorrt_llm
        self._own_workdir = False
        self._shm_prefix = _shm_prefix()
        self._launch = None
        self._drain: DrainState | None = None
        self._lock = threading.Lock()  # the watchdog replaces `process` while stop() may read it
        self.watchdog: Watchdog | None = None  # with options.watchdog
        self._stopping = threading.Event()

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"{self._client_host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port of the HTTP endpoint."""
        return f"{self._client_host}:{self.options.http_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics endpoint."""
        return f"http://{self._client_host}:{self.options.metrics_port}/metrics"

    def command(self, binary: Path, repository: Path, backends: Path | None, rank: int = 0) -> list[str]:
        """The tritonserver command line of one rank (rank 0, the server, by default).

        Rank 0 gets the safe defaults: loopback, no repository control, restricted APIs. Ranks
        above 0 (TensorRT-LLM tensor parallelism) load only the engine and serve no endpoint.
        """
        o = self.options
        restricted = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={o.admin_token}"
        cmd = [str(binary), f"--model-repository={repository}"]
        if rank == 0:
            cmd += [f"--http-address={o.host}", f"--http-port={o.http_port}",
                    f"--grpc-address={o.host}", f"--grpc-port={o.grpc_port}",
                    f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}",
                    "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true",
                    f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
            cmd += o.tls.flags() if o.tls else []
        else:
            cmd += list(WORKER_FLAGS)
        if not self._gpus:  # no GPU to stage copies for or to watch: without these, errors that CUDA and NVML are missing
            cmd += ["--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false"]
        # A per-server (and per-rank) prefix keeps concurrent servers' shared-memory regions apart.
        cmd += ["--disable-auto-complete-config", f"--exit-timeout-secs={o.exit_timeout_s}",
                f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}r{rank}_",
                f"--log-verbose={o.log_verbose}"]
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        return cmd

    def command_line(self, binary: Path, repository: Path, backends: Path | None) -> list[str]:
        """The whole command: tritonserver, or mpirun with one tritonserver per rank."""
        world_size = self.serving.world_size if self.serving else 1
        if world_size > 1:
            find_mpirun()
        return mpirun_command(lambda rank: self.command(binary, repository, backends, rank), world_size)

    def start(self) -> "TritonServer":
        """Prepare everything, start tritonserver and wait until it is ready.

        Raises:
            ServerStartError: the server exited or was not ready in time.
            FileNotFoundError: no tritonserver, stub or checkpoint.
            ValueError: inconsistent options.
        """
        o = self.options
        engines.engine(o.engine)
        if o.engine == "tensorrt_llm":
            self.serving = open_engine(o.engine_dir, o.world_size)
            # --checkpoint may point at the tokenizer when the build-time path is gone (a moved engine)
            self.checkpoint = Path(o.checkpoint) if o.checkpoint else self.serving.tokenizer_checkpoint
        elif o.engine_dir or o.world_size:
            raise ValueError("--engine-dir and --world-size apply to --engine tensorrt_llm only")
        else:
            # a forced kernel build this CPU cannot run: said now, in one line, not after loading
            kernels.choose(kernels.cpu_flags(), os.environ.get(kernels.ENV))
            self.checkpoint = Path(o.checkpoint) if o.checkpoint else ensure_demo_checkpoint(o.demo_size)
        if not (self.checkpoint / "config.json").exists():
            raise FileNotFoundError(f"{self.checkpoint} is not a Hugging Face checkpoint (no config.json)")
        unset = [name for name in ("grpc_port", "http_port", "metrics_port") if getattr(o, name) == 0]
        for name, port in zip(unset, free_ports(len(unset), o.host or "0.0.0.0")):
            setattr(o, name, port)
        self._own_workdir = o.workdir is None
        self.workdir = Path(o.workdir or tempfile.mkdtemp(prefix="reward-server-"))
        binary, bundle = find_tritonserver()
        backends = prepare_backends(bundle, self.workdir / "backends") if bundle else None
        repository = render_repository(o, self.checkpoint, self.workdir / "models", self.serving)
        self.process_model = bool(model_config(repository / "preprocessing").parameters[settings.STEP_TAG].string_value)
        if self.serving:
            config = model_config(repository / engines.TENSORRT_LLM_MODEL)
            check_host(self.serving, config.backend, bundle is not None, parameters=config.parameters)
        self.log_path = self.workdir / "tritonserver.log"
        self._launch = (binary, repository, backends, server_environment(bundle))
        self._drain = DrainState(drain_dir(repository))
        self._drain.reset()
        try:
            self._spawn()
        except BaseException:
            self.stop()
            raise
        if o.watchdog:
            self.watchdog = Watchdog(self).start()
        return self

    def _spawn(self) -> None:
        """Start tritonserver (the command prepared by `start`) and wait until it is ready."""
        binary, repository, backends, env = self._launch
        output = open(self.log_path, "ab")  # always kept: start errors are read back from it
        console = self.options.log_to_console
        started = time.monotonic()
        with self._lock:
            self.process = subprocess.Popen(self.command_line(binary, repository, backends), env=env,
                                            stdout=subprocess.PIPE if console else output, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=die_with_parent)
        if console:  # to the console and to the log file
            console_filter = None if self._gpus else ConsoleFilter(self.log_path)
            threading.Thread(target=tee, args=(self.process.stdout, output, console_filter), daemon=True).start()
        else:
            output.close()
        self.wait_ready(self.options.startup_timeout_s)
        _LOGGER.info("tritonserver ready in %.1fs (gRPC %s, HTTP %s)", time.monotonic() - started,
                     self.grpc_url, self.http_url)

    def restart(self) -> None:
        """Kill tritonserver and its stubs at once, then start it again on the same ports and repository.

        Raises:
            ServerStartError: the new server exited or was not ready in time.
        """
        with self._lock:
            self._kill_group()
            self._remove_shared_memory()
            self._shm_prefix = _shm_prefix()  # the new server's regions never meet the old ones
            self._drain.reset()  # what the old process had in flight is gone with it
        self._spawn()

    def _kill_group(self) -> int:
        try:  # stubs left behind by a killed server share its process group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.process.wait()

    def _remove_shared_memory(self) -> None:
        """Remove the regions a killed server's stubs left in /dev/shm (a clean exit removes its own)."""
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()

    @property
    def stopping(self) -> bool:
        """True once `stop()` began."""
        return self._stopping.is_set()

    def exit_code(self) -> int | None:
        """None while the server is up or being restarted by the watchdog; else its exit code."""
        if self.watchdog is not None:
            return None if not self.watchdog.gave_up.is_set() else (self.process.poll() or 1)
        return self.process.poll() if self.process else None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log (kept in the work directory in both logging modes)."""
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _load_failures(self) -> str:
        """"; model 'x' failed to load: <reason>" for each model that failed (first line of the
        reason), so the cause leads the message instead of hiding above the log tail."""
        if not self.log_path or not self.log_path.exists():
            return ""
        reasons = dict(re.findall(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n|\"|$)",
                                  self.log_path.read_text(errors="replace"), re.M))
        return "".join(f"; model '{name}' failed to load: {reason}" for name, reason in reasons.items())

    def is_ready(self) -> bool:
        """True when the server answers ready on HTTP."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Block until ready: models loaded (HTTP readiness) and the metrics endpoint answering
        (Triton starts it after the others; the drain and the watchdog read it).

        Raises:
            ServerStartError: the process exited, or `timeout_s` passed.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._stopping.is_set():
                raise ServerStartError("stopped while waiting for tritonserver to be ready")
            if self.process.poll() is not None:
                raise ServerStartError(f"tritonserver exited with code {self.process.returncode}"
                                       f"{self._load_failures()}:\n{self.log_tail()}")
            if self.is_ready() and read_metrics(self.metrics_url) is not None:
                return
            time.sleep(0.25)
        raise ServerStartError(f"tritonserver was not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Graceful stop: SIGTERM lets in-flight requests finish, then SIGKILL after the exit timeout."""
        if self.process is None:
            return None
        self._stopping.set()  # from here on, the watchdog restarts nothing
        if self.process.poll() is None and self._drain is not None:
            settle = settle_time_from_metrics(self.metrics_url, engines.engine(self.options.engine).step_model)
            self._drain.admit_arrived(self.metrics_url)  # requests already sent are answered, not refused
            left = self._drain.drain(self.options.exit_timeout_s, settle)
            if left:
                _LOGGER.warning("drain: %d accepted requests never reached postprocessing (failed at the engine "
                                "step, or still running at the exit timeout); stopping", left)
        watchdog, self.watchdog = self.watchdog, None
        if watchdog is not None:
            watchdog.stop()  # no restart from here on; `self.process` is final
        try:
            if self.process.poll() is None:
                self._terminate()
            code = self._kill_group()
        finally:
            if watchdog is not None:
                # Only now: a server the watchdog started gets SIGTERM when its thread ends
                # (PR_SET_PDEATHSIG), and a second SIGTERM can hang tritonserver (reward_server.supervisor.watchdog).
                watchdog.release()
        self._remove_shared_memory()
        if self._own_workdir and self.workdir and not self.options.log_to_console and code not in (0, None):
            _LOGGER.warning("tritonserver exited with %s; log kept at %s", code, self.log_path)
        elif self._own_workdir and self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def _terminate(self) -> None:
        """SIGTERM, once, and wait for the exit; on timeout the caller kills the process group.
        Never a second SIGTERM to tritonserver: its handler can deadlock on one (reward_server.supervisor.watchdog).

        Under mpirun only rank 0 is signalled (not mpirun, which kills its ranks 1 s later; not the
        workers, which have no signal handler while the leader runs: see reward_server.supervisor.mpi).
        Rank 0 stopping releases the workers, and ranks that all exit end mpirun. Workers still
        running after the exit timeout get SIGTERM too, before the group is killed.
        """
        leader, workers = ranks(self.process.pid) if self.process.args[0] == "mpirun" else (None, [])
        with contextlib.suppress(ProcessLookupError):
            os.kill(leader or self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(self.options.exit_timeout_s + 15)
            return
        except subprocess.TimeoutExpired:
            pass
        if workers:
            _LOGGER.warning("ranks %s still running after the exit timeout; sending them SIGTERM", workers)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
                return
        _LOGGER.warning("tritonserver did not stop in time; killing it")

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
