"""The liveness probe (`python -m reward_server.probe`) against a real server and a dead port."""

from __future__ import annotations

import subprocess
import sys
import time

from reward_server.probe import main, probe
from reward_server.supervisor.ports import free_port


def test_probe_scores_through_a_real_server(server):
    result = probe(server.grpc_url, timeout_s=10)
    assert result.alive, result.reason
    assert result.reason.startswith(f"{server.grpc_url}: score ")


def test_probe_command_exits_zero_with_one_line(server):
    run = subprocess.run([sys.executable, "-m", "reward_server.probe", "--url", server.grpc_url, "--timeout", "10"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ok ") and " score " in lines[0]


def test_probe_fails_fast_on_a_closed_port(capsys):
    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["--url", url, "--timeout", "3"]) == 1
    elapsed = time.monotonic() - started
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"FAIL {url}: StatusCode.UNAVAILABLE"), line
    assert "\n" not in line and elapsed < 5


def test_probe_fails_when_the_model_cannot_score(server):
    # A server that is up but whose model cannot answer must not count as alive.
    result = probe(server.grpc_url, timeout_s=5, model="no_such_model")
    assert not result.alive
    assert "no_such_model" in result.reason
