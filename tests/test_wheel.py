"""`pip install` of the wheel alone gives a working server: the wheel is built here, installed into
a fresh virtual environment, and `reward-server serve` runs from a directory outside the source
tree, with no compiler to be found, reading the model repository and running the compiled native
kernels the wheel carries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np

from reward_client import RewardClient
from reward_server.pipeline.torch_engine import kernels
from reward_server.pipeline.torch_engine.kernels.build import digest, torch_build
from reward_server.supervisor.ports import free_ports
from tests.conversations import make_conversations
from tests.test_observability import kernel_info

ROOT = Path(__file__).resolve().parents[1]


def _run(*command, cwd=None):
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


def test_the_wheel_serves_from_a_fresh_venv(tmp_path, demo_checkpoint, server):
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", ROOT)
    [wheel] = (tmp_path / "dist").glob("reward_server-*.whl")
    # a platform wheel: pip installs it only where its compiled kernels load
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name == f"reward_server-0.1.0-{python}-{python}-linux_x86_64.whl"
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    for model in ("reward", "reward_ids", "reward_text", "preprocessing", "reward_engine", "postprocessing",
                  "reward_engine_trtllm", "tensorrt_llm"):
        assert f"reward_server/model_repository/{model}/config.pbtxt" in names, model
    assert {"reward_server/model_repository/reward_engine/1/model.py", "reward_server/pipeline/torch_engine/kernels/attention.cpp",
            "reward_server/gateway/static/index.html"} <= names
    assert not any(name.startswith(("tests/", "bench/", "client/")) for name in names)
    # one compiled module per instruction set, each the one its manifest names, built against this torch
    lib = "reward_server/pipeline/torch_engine/kernels/lib/"
    manifest = json.loads(archive.read(lib + "manifest.json"))
    assert sorted(manifest["modules"]) == sorted(v.name for v in kernels.VARIANTS)
    assert {name for name in names if name.startswith(lib) and name.endswith(".so")} == \
        {lib + module for module in manifest["modules"].values()}
    assert manifest["build"] == torch_build() and manifest["digest"] == digest()

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)  # this pip installs into it (--python)
    # The dependencies are this environment's (a full install would download torch): its package
    # directory on the new venv's path, read after the venv's own, so the wheel's reward_server wins
    # over this checkout's editable install (whose .pth hook is not read for an added path).
    site_packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    found = _run(venv / "bin" / "python", "-c", "import reward_server.supervisor.options as o; print(o.MODEL_REPOSITORY)",
                 cwd=outside).stdout.strip()
    assert found == str(site_packages / "reward_server" / "model_repository")

    # No compiler to be found: on PATH only the venv and a shell (Triton's Python backend starts its
    # stubs through bash), CC and CXX pointing nowhere, an empty cache (no kernels compiled before).
    # Whatever attention runs must have come in the wheel.
    tools = tmp_path / "tools"
    tools.mkdir()
    for shell in ("bash", "sh"):
        (tools / shell).symlink_to(shutil.which(shell))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{tools}", CC=str(tmp_path / "no-cc"), CXX=str(tmp_path / "no-cxx"),
               REWARD_SERVER_CACHE=str(tmp_path / "cache"))
    expected_isa = kernels.choose(kernels.cpu_flags()).name
    check = subprocess.run([venv / "bin" / "python", "-m", "reward_server.pipeline.torch_engine.kernels", "--check"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and f"this CPU loads {expected_isa} build (prebuilt" in check.stdout, \
        check.stdout + check.stderr
    grpc, http, metrics = free_ports(3, "127.0.0.1")
    process = subprocess.Popen([venv / "bin" / "reward-server", "serve", "--checkpoint", demo_checkpoint,
                                "--max-length", "512", "--token-budget", "1024", "--grpc-port", str(grpc),
                                "--http-port", str(http), "--metrics-port", str(metrics)],
                               cwd=outside, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        conversations = make_conversations(4, seed=31)
        with RewardClient(f"127.0.0.1:{grpc}") as client:
            client.wait_until_ready(timeout_s=180)
            scores = [r.score for r in client.score(conversations)]
        with RewardClient(server.grpc_url) as client:  # the source tree's server on the same checkpoint
            expected = [r.score for r in client.score(conversations)]
        np.testing.assert_array_equal(scores, expected)
        # the shipped build this CPU runs, not torch's SDPA, nor a build at start-up
        assert kernel_info(f"http://127.0.0.1:{metrics}/metrics") == \
            [{"attention": "native", "isa": expected_isa, "model": "reward_engine", "origin": "prebuilt"}]
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output[-3000:]
    assert not (tmp_path / "cache" / "kernels").exists()  # nothing was compiled

    # Kernels compiled against another torch are refused in one clear line, not loaded into a crash.
    installed = site_packages / "reward_server" / "pipeline" / "torch_engine" / "kernels" / "lib" / "manifest.json"
    manifest["build"]["torch"] = "2.12.0"
    installed.write_text(json.dumps(manifest))
    refused = subprocess.run([venv / "bin" / "python", "-c", "from reward_server.pipeline.torch_engine import "
                              "kernels; kernels.attention()"], cwd=outside, env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0
    assert f"KernelRefused: the native kernels in {installed.parent} were compiled against torch 2.12.0, this " \
           f"environment has torch {torch_build()['torch']}: install torch==2.12.0" in refused.stderr.splitlines()[-1]
    check = subprocess.run([venv / "bin" / "python", "-m", "reward_server.pipeline.torch_engine.kernels", "--check"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "built against torch 2.12.0" in check.stderr, check.stdout + check.stderr
