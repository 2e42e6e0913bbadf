"""gRPC over TLS and mutual TLS with certificates made here, against a real tritonserver (issue 10;
docs/security.md). The restricted APIs and the loopback default are tested in test_server.py."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from reward_server.cli import _serve_parser, _tls
from reward_server.supervisor.options import ServeOptions, TlsOptions
from reward_server.supervisor.server import TritonServer

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _write(path: Path, key, cert) -> None:
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _certificate(subject: str, issuer_key, issuer_name, key, *, ca: bool, san=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files;
    plus a second, unrelated CA's client certificate."""
    root = tmp_path_factory.mktemp("pki")
    for prefix in ("", "rogue-"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{prefix}test CA")])
        _write(root / f"{prefix}ca", ca_key, _certificate(f"{prefix}test CA", ca_key, ca_name, ca_key, ca=True))
        client_key = ec.generate_private_key(ec.SECP256R1())
        _write(root / f"{prefix}client", client_key,
               _certificate("trainer", ca_key, ca_name, client_key, ca=False))
        if not prefix:
            server_key = ec.generate_private_key(ec.SECP256R1())
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            _write(root / "server", server_key, _certificate("localhost", ca_key, ca_name, server_key, ca=False,
                                                             san=san))
    return root


@pytest.fixture(scope="module")
def tls_server(demo_checkpoint, pki):
    tls = TlsOptions(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt", mutual=True)
    with TritonServer(ServeOptions(checkpoint=demo_checkpoint, max_length=512, tls=tls, startup_timeout_s=120)) as srv:
        yield srv


def _score(url: str, **ssl) -> float:
    client = grpcclient.InferenceServerClient(url, **ssl)
    data = np.array([[json.dumps(CONVERSATION).encode()]], dtype=object)
    tensor = grpcclient.InferInput("messages", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    try:
        return float(client.infer("reward", [tensor], client_timeout=20).as_numpy("score")[0, 0])
    finally:
        client.close()


def test_mutual_tls_scores_with_a_client_certificate_and_refuses_everyone_else(tls_server, pki):
    trusted = dict(ssl=True, root_certificates=str(pki / "ca.crt"))
    score = _score(tls_server.grpc_url, **trusted, private_key=str(pki / "client.key"),
                   certificate_chain=str(pki / "client.crt"))
    assert np.isfinite(score)
    refused = {
        "plaintext": {},
        "no client certificate": trusted,
        "certificate of another CA": dict(trusted, private_key=str(pki / "rogue-client.key"),
                                          certificate_chain=str(pki / "rogue-client.crt")),
        "server not trusted": dict(ssl=True, root_certificates=str(pki / "rogue-ca.crt"),
                                   private_key=str(pki / "client.key"), certificate_chain=str(pki / "client.crt")),
    }
    for name, ssl in refused.items():
        with pytest.raises(InferenceServerException) as info:
            _score(tls_server.grpc_url, **ssl)
        assert info.value.status() == "StatusCode.UNAVAILABLE", (name, info.value)
    # The HTTP endpoint (loopback only by default) still answers the readiness probe.
    assert tls_server.is_ready()


def test_tls_flags_reach_tritonserver_and_bad_settings_fail_early(pki, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    _serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")])
    tls = _tls(args)
    assert tls.flags() == ["--grpc-use-ssl=true", f"--grpc-server-cert={pki / 'server.crt'}",
                           f"--grpc-server-key={pki / 'server.key'}"]
    server = TritonServer(ServeOptions(tls=tls))
    command = server.command(Path("tritonserver"), tmp_path, None)
    assert "--grpc-use-ssl=true" in command and "--grpc-use-ssl-mutual=true" not in command
    assert "--grpc-use-ssl=true" not in server.command(Path("tritonserver"), tmp_path, None, rank=1)
    mutual = TlsOptions(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt", mutual=True)
    assert mutual.flags()[-2:] == [f"--grpc-root-cert={pki / 'ca.crt'}", "--grpc-use-ssl-mutual=true"]
    assert _tls(parser.parse_args(["serve"])) is None
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        _tls(parser.parse_args(["serve", "--tls-cert", str(pki / "server.crt")]))
    with pytest.raises(ValueError, match="needs the CA"):
        TlsOptions(cert=pki / "server.crt", key=pki / "server.key", mutual=True)
    with pytest.raises(FileNotFoundError):
        TlsOptions(cert=tmp_path / "missing.crt", key=pki / "server.key")


def test_grpc_restricted_apis_need_the_admin_header_and_the_default_bind_is_loopback(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            client.get_system_shared_memory_status()
        # Over gRPC, Triton expects the header name behind its own prefix.
        key = "triton-grpc-protocol-reward-server-admin"
        assert client.get_system_shared_memory_status(headers={key: server.options.admin_token}) is not None
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            client.get_system_shared_memory_status(headers={key: "wrong"})
    finally:
        client.close()
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                address, port = local.rsplit(":", 1)
                listening.add((address, int(port, 16)))
    ports = {server.options.grpc_port, server.options.http_port, server.options.metrics_port}
    bound = {address for address, port in listening if port in ports}
    # 127.0.0.1 (and gRPC's IPv4-mapped ::ffff:127.0.0.1 socket), nothing on 0.0.0.0 or ::
    assert bound and bound <= {"0100007F", "0000000000000000FFFF00000100007F"}, bound


def test_the_client_sdk_and_cli_speak_mutual_tls(tls_server, pki, tmp_path):
    import asyncio

    from reward_client import AsyncRewardClient, RewardClient, RewardUnavailableError, RetryPolicy, TlsConfig
    from reward_client.cli import main as client_main

    tls = TlsConfig(root_certificates=str(pki / "ca.crt"), certificate_chain=str(pki / "client.crt"),
                    private_key=str(pki / "client.key"))
    expected = _score(tls_server.grpc_url, **tls.client_kwargs())
    with RewardClient(tls_server.grpc_url, tls=tls) as client:
        assert client.score([CONVERSATION])[0].score == pytest.approx(expected, rel=1e-5)

    async def run():
        async with AsyncRewardClient(tls_server.grpc_url, tls=tls) as client:
            return [r.score async for r in client.iter_scores([CONVERSATION])]

    assert asyncio.run(run()) == pytest.approx([expected], rel=1e-5)
    with RewardClient(tls_server.grpc_url, tls=TlsConfig(root_certificates=str(pki / "ca.crt")),
                      retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(RewardUnavailableError):
            client.score([CONVERSATION])  # no client certificate: refused at the handshake
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    assert client_main(["score", str(source), "-o", str(out), "--url", tls_server.grpc_url, "--no-progress",
                        "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"),
                        "--tls-key", str(pki / "client.key")]) == 0
    assert json.loads(out.read_text())["reward"]["score"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="both certificate_chain and private_key"):
        TlsConfig(certificate_chain=str(pki / "client.crt"))


def test_liveness_probe_speaks_tls(tls_server, pki, capsys):
    """`python -m reward_server.probe` scores through a (mutual) TLS server with --tls-*, and fails
    in plaintext or without the client certificate."""
    from reward_server.probe import main

    trusted = ["--url", tls_server.grpc_url, "--timeout", "20", "--tls-ca", str(pki / "ca.crt")]
    assert main(trusted + ["--tls-cert", str(pki / "client.crt"), "--tls-key", str(pki / "client.key")]) == 0
    assert capsys.readouterr().out.startswith("ok ")
    for refused in (trusted, trusted[:4]):
        assert main(refused) == 1
        assert capsys.readouterr().out.startswith("FAIL ")
