"""What the CPU overlay deploys is what runs: its rendered container command and args are started
here as a real process (only host, ports and the checkpoint path rewritten to loopback, free
ports and the tiny test checkpoint), its readiness and liveness probes are run against it, it
scores, and SIGTERM stops it cleanly within the pod's grace period."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from reward_client import RewardClient
from reward_server.supervisor.ports import free_ports
from tests.test_deploy_manifests import only, rendered, server_container
from tests.test_observability import kernel_info

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Five, probably."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Teal."}],
]


def rewrite(argv: list[str], values: dict[str, str]) -> list[str]:
    """Replace the value of each flag in `values` (``--flag=v`` or ``--flag v``), nothing else.

    Raises:
        AssertionError: a flag to rewrite is absent or given twice.
    """
    out, seen, skip = [], {}, False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in values:
            seen[flag] = seen.get(flag, 0) + 1
            if "=" in arg:
                out.append(f"{flag}={values[flag]}")
            else:
                out.extend([flag, values[flag]])
                skip = True
        else:
            out.append(arg)
    assert seen == dict.fromkeys(values, 1), f"flags to rewrite {values} found {seen} times in {argv}"
    return out


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


@pytest.fixture(scope="module")
def cpu_overlay():
    objects = rendered("overlays/cpu")
    return only(objects, "Deployment")["spec"]["template"]["spec"], server_container(objects)


def test_rewrite_touches_only_the_named_flags():
    argv = ["serve", "--host=0.0.0.0", "--grpc-port", "8001", "--threads=4"]
    assert rewrite(argv, {"--host": "127.0.0.1", "--grpc-port": "9"}) == \
        ["serve", "--host=127.0.0.1", "--grpc-port", "9", "--threads=4"]
    with pytest.raises(AssertionError):
        rewrite(argv, {"--checkpoint": "/x"})


def test_cpu_overlay_command_serves_probes_scores_and_stops_on_sigterm(cpu_overlay, demo_checkpoint, server,
                                                                         tmp_path):
    pod, container = cpu_overlay
    ports = dict(zip(("--grpc-port", "--http-port", "--metrics-port"), map(str, free_ports(3))))
    argv = rewrite(container["command"] + container["args"],
                   {"--host": "127.0.0.1", "--checkpoint": str(demo_checkpoint), **ports})
    # Everything else is the manifest's, word for word: same executable, subcommand and options.
    assert argv[:2] == ["reward-server", "serve"]
    assert [a for a in argv if a.split("=")[0] not in ("--host", "--checkpoint", *ports)] == \
        [a for a in container["command"] + container["args"]
         if a.split("=")[0] not in ("--host", "--checkpoint", *ports)]
    # The pod's environment, with its writable paths moved under tmp_path.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path}
    for item in container["env"]:
        value = item["value"]
        env[item["name"]] = str(tmp_path / value.strip("/").replace("/", "_")) if value.startswith("/") else value
    executable = shutil.which(argv[0], path=path)
    assert executable, f"{argv[0]} is not installed in this environment"
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([executable, *argv[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    http = f"http://127.0.0.1:{ports['--http-port']}"
    grpc = f"127.0.0.1:{ports['--grpc-port']}"
    try:
        ready_path = container["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 180
        while http_status(http + ready_path) != 200:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready within 180 s"
            time.sleep(0.5)
        assert http_status(http + container["startupProbe"]["httpGet"]["path"]) == 200
        # The liveness probe exactly as the pod runs it, pointed at this server's gRPC port.
        probe = rewrite(container["livenessProbe"]["exec"]["command"], {"--url": grpc})
        run = subprocess.run(probe, env=env, capture_output=True, text=True,
                             timeout=container["livenessProbe"]["timeoutSeconds"])
        assert run.returncode == 0 and run.stdout.startswith(f"ok {grpc}: score "), run.stdout + run.stderr
        with RewardClient(grpc) as client, RewardClient(server.grpc_url) as reference:
            got = [r.score for r in client.score(CONVERSATIONS)]
            expected = [r.score for r in reference.score(CONVERSATIONS)]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
        # the native kernels the installed package carries, not SDPA, nor a build at start-up
        [kernel] = kernel_info(f"http://127.0.0.1:{ports['--metrics-port']}/metrics")
        assert (kernel["attention"], kernel["origin"]) == ("native", "prebuilt"), kernel
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=pod["terminationGracePeriodSeconds"])
        stopped_in = time.monotonic() - stopping
        assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert stopped_in < pod["terminationGracePeriodSeconds"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
