"""What `reward-server serve` is asked to do: the serve options and the gRPC TLS options, and where
the model repository they render from lives."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from reward_server.pipeline.scoring import DEFAULT_AGGREGATE

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # reward_server/
PROJECT_ROOT = PACKAGE_DIR.parent  # the source tree, or site-packages for a wheel
# An installed wheel carries the model repository inside the package; a source tree (and an
# editable install) has it at the root.
MODEL_REPOSITORY = next((path for path in (PACKAGE_DIR / "model_repository", PROJECT_ROOT / "model_repository")
                         if path.is_dir()), PROJECT_ROOT / "model_repository")


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
    attention: str = "auto"                  # torch engine: auto | native | sdpa (attention.ATTENTIONS)
    torch_threads: int | None = None
    token_budget: int | None = None
    min_shared_prefix: int | None = None
    prefix_cache_mb: float | None = None     # torch engine: bound of the cross-request prefix cache; 0: off
    max_queue_size: int | None = None
    max_queue_delay_us: int | None = None
    queue_timeout_us: int | None = None      # engine queue: refuse (UNAVAILABLE) requests waiting longer; 0: never
    max_queue_seconds: float | None = None   # torch engine queue: seconds of queued work admitted (default 2)
    max_conversation_bytes: int | None = None  # preprocessing: byte limits checked before parsing
    max_request_bytes: int | None = None
    tls: TlsOptions | None = None            # gRPC over TLS (mutual TLS when tls.mutual)
    watchdog: bool = False                   # restart tritonserver when it or a stub dies (supervisor.watchdog)
    model_repository: Path = MODEL_REPOSITORY
    workdir: Path | None = None
    log_to_console: bool = False
    log_verbose: int = 0
    startup_timeout_s: float = 300.0
    exit_timeout_s: int = 30
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
