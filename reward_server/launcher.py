"""Start a real tritonserver on a checkpoint: find the binary, prepare the Python backend,
render a runtime copy of model_repository/ with overrides, start, wait until ready, stop.

The checked-in configs stay complete and valid; overrides are applied to the parsed
`ModelConfig` protobufs and written to a runtime directory, never by text templating.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from reward_server import engines, settings
from reward_server.chat import sliding_window
from reward_server.drain import DrainState, read_metrics, settle_time_from_metrics
from reward_server.heads import detect_head_type, num_outputs, parse_indices, process_layout, step_tag_or_default
from reward_server.ports import free_ports
from reward_server.scoring import DEFAULT_AGGREGATE, ScoreSpec, parse_floats
from reward_server.trtllm.mpi import WORKER_FLAGS, find_mpirun, mpirun_command, ranks

_LOGGER = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the source tree, or site-packages for a wheel
# An installed wheel carries the model repository inside the package; a source tree (and an
# editable install) has it at the root.
MODEL_REPOSITORY = next((path for path in (Path(__file__).resolve().parent / "model_repository",
                                           PROJECT_ROOT / "model_repository") if path.is_dir()),
                        PROJECT_ROOT / "model_repository")
ENGINE_MODEL = engines.ENGINES["torch"].step_model
# APIs a scoring client never needs; restricted because the bundled 2.51 server predates the
# Python-backend shared-memory fixes (DESIGN.md). Calls need this header with the admin token.
RESTRICTED_APIS = "shared-memory,model-repository,logging,trace"
ADMIN_HEADER = "reward-server-admin"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launching thread dies (Linux), so a killed
    launcher or test run never leaves a server behind. A thread that starts a server must therefore
    outlive it when the server is stopped on purpose (the watchdog's does: reward_server.health)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tee(pipe, log) -> None:
    """Copy a server's output to this process's stdout and to its log file until it ends. The pipe
    is always drained (a full pipe would block the server), even once the console is gone."""
    console = getattr(sys.stdout, "buffer", sys.stdout)
    with log:
        for chunk in iter(lambda: pipe.read1(1 << 16), b""):
            log.write(chunk)
            log.flush()
            if console is None:
                continue
            try:
                console.write(chunk if console is not sys.stdout else chunk.decode(errors="replace"))
                console.flush()
            except (OSError, ValueError):  # this process's stdout was closed
                console = None


def _shm_prefix() -> str:
    return f"reward{os.getpid()}x{secrets.token_hex(3)}"


class ServerStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with its log tail."""


@dataclass(frozen=True)
class TlsOptions:
    """gRPC TLS with Triton's own options: the server's certificate chain and key (PEM files) and,
    for mutual TLS, the CA whose certificates clients must present."""

    cert: Path
    key: Path
    ca: Path | None = None
    mutual: bool = False

    def __post_init__(self):
        if self.mutual and self.ca is None:
            raise ValueError("mutual TLS needs the CA that signs client certificates (--tls-ca)")
        for path in (self.cert, self.key, self.ca):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"TLS file {path} does not exist")

    def flags(self) -> list[str]:
        """tritonserver's --grpc-* SSL flags."""
        flags = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.ca is not None:
            flags.append(f"--grpc-root-cert={self.ca}")
        if self.mutual:
            flags.append("--grpc-use-ssl-mutual=true")
        return flags


@dataclass
class ServeOptions:
    """What to serve and how. Ports of 0 pick free ports (tests); the CLI passes 8001/8000/8002."""

    checkpoint: str | Path | None = None
    demo_size: str = "small"
    engine: str = "torch"
    engine_dir: str | Path | None = None     # --engine tensorrt_llm: a build-engine output directory
    world_size: int | None = None            # --engine tensorrt_llm: MPI ranks (default: the engine's tp x pp)
    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    instances: int = 1
    max_length: int | None = None
    truncation: str = "reject"
    chat_template: str | None = None
    head_type: str = "auto"
    reward_indices: str | None = None
    step_tag: str | None = None              # process reward models: the step tag (token or id)
    step_labels: str | None = None           # process reward models on a causal LM: "POSITIVE,NEGATIVE" ids
    step_aggregate: str = DEFAULT_AGGREGATE  # process reward models: min | last | mean | product
    attribute_names: str | None = None
    attribute_weights: str | None = None
    score_mean: float = 0.0
    score_std: float = 1.0
    device: str = "auto"
    dtype: str = "auto"                      # torch engine: auto | float32 | bfloat16
    compile: bool = False                    # torch engine: torch.compile the decoder layers at load
    attention: str = "auto"                  # torch engine: auto | native | sdpa (engine.ATTENTIONS)
    torch_threads: int | None = None
    token_budget: int | None = None
    min_shared_prefix: int | None = None
    max_queue_size: int | None = None
    max_queue_delay_us: int | None = None
    queue_timeout_us: int | None = None      # engine queue: reject (UNAVAILABLE) requests waiting longer
    max_conversation_bytes: int | None = None  # preprocessing: byte limits checked before parsing
    max_request_bytes: int | None = None
    tls: TlsOptions | None = None            # gRPC over TLS (mutual TLS when tls.mutual)
    watchdog: bool = False                   # restart tritonserver when it or a stub dies (reward_server.health)
    model_repository: Path = MODEL_REPOSITORY
    workdir: Path | None = None
    log_to_console: bool = False
    log_verbose: int = 0
    startup_timeout_s: float = 300.0
    exit_timeout_s: int = 30
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))


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


def demo_checkpoint_dir(size: str) -> Path:
    """Where the demo checkpoint of `size` lives (built on first use)."""
    cache = Path(os.environ.get("REWARD_SERVER_CACHE", Path.home() / ".cache" / "reward-server"))
    return cache / f"demo-{size}"


def ensure_demo_checkpoint(size: str) -> Path:
    """Build the demo checkpoint once; a finished build is renamed into place atomically."""
    target = demo_checkpoint_dir(size)
    if (target / "config.json").exists():
        return target
    from reward_server.demo_checkpoint import build_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".demo-{size}-", dir=target.parent))
    _LOGGER.info("building the %s demo checkpoint in %s", size, target)
    build_checkpoint(staging, size=size)
    try:
        staging.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_outputs(k: int, score: ScoreSpec, names: list[str]) -> int:
    """K, after checking the attribute weights and names against it."""
    score.check(k)
    if names and len(names) != k:
        raise ValueError(f"{len(names)} attribute names given for a model with {k} outputs")
    return k


def _byte_limits(options: ServeOptions) -> dict[str, str]:
    return {settings.MAX_CONVERSATION_BYTES: str(options.max_conversation_bytes or ""),
            settings.MAX_REQUEST_BYTES: str(options.max_request_bytes or "")}


def model_parameters(options: ServeOptions, checkpoint: Path,
                     serving=None) -> tuple[dict[str, dict[str, str]], int]:
    """Per-model parameter overrides and K, checked against the checkpoint (or, for TensorRT-LLM,
    the opened engine directory `serving`).

    Raises:
        ValueError: inconsistent options (head, indices, weights, names, lengths).
    """
    names = [n.strip() for n in (options.attribute_names or "").split(",") if n.strip()]
    score = ScoreSpec(parse_floats(options.attribute_weights), options.score_mean, options.score_std)
    if serving is not None:
        from reward_server.trtllm.serving import model_parameters as engine_parameters

        process = serving.spec.head_type == "process"
        if process and (options.step_tag or options.step_labels):
            raise ValueError("the engine was built with its step tag and labels: they are set by build-engine "
                             "(--step-tag, --step-labels), not at serve time")
        steps = _step_options(options) if process else {}
        k = -1 if process else _check_outputs(serving.num_outputs, score, names)
        params = engine_parameters(serving, options.max_length, names, options.reward_indices)
        params["preprocessing"].update({settings.CHECKPOINT: str(checkpoint), settings.TRUNCATION: options.truncation,
                                        settings.CHAT_TEMPLATE: options.chat_template or "", **_byte_limits(options)})
        params["postprocessing"].update({settings.ATTRIBUTE_WEIGHTS: options.attribute_weights or "",
                                         settings.SCORE_MEAN: str(options.score_mean),
                                         settings.SCORE_STD: str(options.score_std), **steps})
        return params, k
    config = json.loads((checkpoint / "config.json").read_text())
    head = detect_head_type(config.get("architectures"), options.head_type)
    window = sliding_window(config)
    if window is not None and options.max_length is not None and options.max_length > window:
        raise ValueError(f"--max-length {options.max_length} is over the model's sliding window of {window} tokens, "
                         "which the packed engine does not apply: longer conversations would be scored wrongly")
    indices = parse_indices(options.reward_indices)
    steps = _step_parameters(options, config) if head == "process" else {}
    k = -1 if steps else _check_outputs(num_outputs(config, head, indices), score, names)  # -1: one per step
    cores = os.cpu_count() or 1
    threads = options.torch_threads or max(1, cores // max(1, options.instances))
    optional = lambda value: "" if value is None else str(value)  # noqa: E731
    params = {
        "preprocessing": {settings.CHECKPOINT: str(checkpoint), settings.MAX_LENGTH: optional(options.max_length),
                          settings.TRUNCATION: options.truncation, settings.STEP_TAG: steps.get(settings.STEP_TAG, ""),
                          settings.CHAT_TEMPLATE: options.chat_template or "", **_byte_limits(options)},
        ENGINE_MODEL: {settings.CHECKPOINT: str(checkpoint), settings.HEAD_TYPE: head,
                       settings.REWARD_INDICES: ",".join(map(str, indices)), settings.DEVICE: options.device,
                       settings.TORCH_THREADS: str(threads), settings.DTYPE: options.dtype,
                       settings.COMPILE: "true" if options.compile else "false",
                       settings.ATTENTION: options.attention, settings.STEP_TAG: steps.get(settings.STEP_TAG, ""),
                       settings.STEP_LABELS: steps.get(settings.STEP_LABELS, "")},
        "postprocessing": {settings.ATTRIBUTE_NAMES: ",".join(names or [f"reward_{i}" for i in range(k)]),
                           settings.STEP_AGGREGATE: steps.get(settings.STEP_AGGREGATE, ""),
                           settings.ATTRIBUTE_WEIGHTS: options.attribute_weights or "",
                           settings.SCORE_MEAN: str(options.score_mean),
                           settings.SCORE_STD: str(options.score_std)},
    }
    if options.token_budget:
        params[ENGINE_MODEL][settings.TOKEN_BUDGET] = str(options.token_budget)
    if options.min_shared_prefix is not None:
        params[ENGINE_MODEL][settings.MIN_SHARED_PREFIX] = str(options.min_shared_prefix)
    return params, k


def _step_options(options: ServeOptions) -> dict[str, str]:
    """Postprocessing's parameters for a process reward model (either engine).

    Raises:
        ValueError: an unknown aggregate, or outcome-only options (attribute names or weights).
    """
    if options.attribute_names or options.attribute_weights:
        raise ValueError("a process reward model has one score per step: --attribute-names and "
                         "--attribute-weights do not apply (its score is --step-aggregate of the steps)")
    ScoreSpec(aggregate=options.step_aggregate)  # raises on an unknown rule
    return {settings.STEP_AGGREGATE: options.step_aggregate}


def _step_parameters(options: ServeOptions, config: dict) -> dict[str, str]:
    """A process reward model's step tag, labels and aggregate for the torch engine, checked before
    anything loads (the models check the tag and labels against the vocabulary when they load).

    Raises:
        ValueError: no tag where the model has no default one, a causal LM without its two labels,
            or what `_step_options` refuses.
    """
    architecture = (config.get("architectures") or [""])[0]
    steps = _step_options(options)
    tag = str(step_tag_or_default(architecture, options.step_tag))
    process_layout(architecture, options.step_labels)
    return {settings.STEP_TAG: tag, settings.STEP_LABELS: options.step_labels or "", **steps}


def render_repository(options: ServeOptions, checkpoint: Path, dest: Path, serving=None) -> Path:
    """Write the runtime model repository: the engine's models and the common ones, parsed configs
    with overrides, the ensembles' engine step pointing at the chosen engine, model files copied."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    params, k = model_parameters(options, checkpoint, serving)
    served = engines.served_models(options.engine)
    missing = [name for name in served if not (options.model_repository / name / "config.pbtxt").exists()]
    if missing:
        raise FileNotFoundError(f"model repository {options.model_repository} lacks {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    for model_dir in (options.model_repository / name for name in served):
        config = model_config(model_dir)
        if config.platform == "ensemble":
            engines.wire_ensemble(config, options.engine)
        for key, value in params.get(config.name, {}).items():
            config.parameters[key].string_value = value
        if settings.DRAIN_DIR in config.parameters:
            config.parameters[settings.DRAIN_DIR].string_value = str(drain_dir(dest))
        for tensor in [*config.input, *config.output]:
            if tensor.name in ("rewards", "attributes"):
                tensor.dims[:] = [k]
        if config.name == engines.engine(options.engine).step_model:
            config.instance_group[0].count = options.instances
            if options.max_queue_size is not None:
                config.dynamic_batching.default_queue_policy.max_queue_size = options.max_queue_size
            if options.max_queue_delay_us is not None:
                config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
            if options.queue_timeout_us:
                policy = config.dynamic_batching.default_queue_policy
                policy.default_timeout_microseconds = options.queue_timeout_us
                policy.timeout_action = model_config_pb2.ModelQueuePolicy.REJECT
                policy.allow_timeout_override = True
        shutil.copytree(model_dir, dest / model_dir.name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "config.pbtxt"))
        (dest / model_dir.name / "config.pbtxt").write_text(text_format.MessageToString(config))
        if config.backend == "python":
            (dest / model_dir.name / "reward_server_paths.py").write_text(python_paths_module())
    return dest


def drain_dir(repository: Path) -> Path:
    """Where the launcher and the models of a runtime repository share the drain state."""
    return repository.parent / "drain"


def model_config(model_dir: Path):
    """A model directory's config.pbtxt, parsed (`ModelConfig`)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


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
        self.serving = None  # the opened engine directory, with --engine tensorrt_llm
        self._own_workdir = False
        self._shm_prefix = _shm_prefix()
        self._launch = None
        self._drain: DrainState | None = None
        self._lock = threading.Lock()  # the watchdog replaces `process` while stop() may read it
        self.watchdog = None           # reward_server.health.Watchdog, with options.watchdog
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
            from reward_server.trtllm.serving import open_engine

            self.serving = open_engine(o.engine_dir, o.world_size)
            # --checkpoint may point at the tokenizer when the build-time path is gone (a moved engine)
            self.checkpoint = Path(o.checkpoint) if o.checkpoint else self.serving.tokenizer_checkpoint
        elif o.engine_dir or o.world_size:
            raise ValueError("--engine-dir and --world-size apply to --engine tensorrt_llm only")
        else:
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
            from reward_server.trtllm.serving import check_host

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
            from reward_server.health import Watchdog

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
                                            start_new_session=True, preexec_fn=_die_with_parent)
        if console:  # to the console and to the log file
            threading.Thread(target=_tee, args=(self.process.stdout, output), daemon=True).start()
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
                # (PR_SET_PDEATHSIG), and a second SIGTERM can hang tritonserver (reward_server.health).
                watchdog.release()
        self._remove_shared_memory()
        if self._own_workdir and self.workdir and not self.options.log_to_console and code not in (0, None):
            _LOGGER.warning("tritonserver exited with %s; log kept at %s", code, self.log_path)
        elif self._own_workdir and self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def _terminate(self) -> None:
        """SIGTERM, once, and wait for the exit; on timeout the caller kills the process group.
        Never a second SIGTERM to tritonserver: its handler can deadlock on one (reward_server.health).

        Under mpirun only rank 0 is signalled (not mpirun, which kills its ranks 1 s later; not the
        workers, which have no signal handler while the leader runs: see reward_server.trtllm.mpi).
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
