"""gRPC over TLS and mutual TLS for the reward client."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings of the gRPC connection (PEM file paths).

    Attributes:
        root_certificates: CA certificate(s) that sign the server's certificate (None: the
            system's trust store).
        certificate_chain: this client's certificate, for servers that require mutual TLS.
        private_key: the key of ``certificate_chain``.

    Raises:
        ValueError: if only one of ``certificate_chain`` and ``private_key`` is given, or a given
            file does not exist.
    """

    root_certificates: Optional[str] = None
    certificate_chain: Optional[str] = None
    private_key: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs both certificate_chain and private_key")
        for path in (self.root_certificates, self.certificate_chain, self.private_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")

    def client_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of tritonclient's gRPC ``InferenceServerClient`` (sync and asyncio)."""
        return {"ssl": True, "root_certificates": self.root_certificates, "private_key": self.private_key,
                "certificate_chain": self.certificate_chain}


def client_kwargs(tls: Optional[TlsConfig]) -> Dict[str, Any]:
    """``tls.client_kwargs()``, or no arguments for a plaintext connection."""
    return tls.client_kwargs() if tls is not None else {}
