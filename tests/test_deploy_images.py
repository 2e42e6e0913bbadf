"""Container images, checked from the Dockerfiles' text (no Docker engine can run here): pinned
bases, non-root USER, no build tools in the final stage, the native kernels compiled into the wheel
the image installs (and checked there), the `reward-server serve` entrypoint, and agreement with
what the manifests expect of them. That the wheel carries a loadable build for every instruction
set is tests/test_wheel.py's part."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

from tests.test_deploy_manifests import rendered, server_container

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
NGC_TAG = "nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3"
ENTRYPOINT = ["reward-server", "serve", "--host", "0.0.0.0"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Instructions split per build stage (each starts at a FROM)."""
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def base_images(dockerfile: Path) -> list[str]:
    """Each FROM's image with ARG defaults substituted (stage names excluded)."""
    args = {}
    names = set()
    images = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key, value)
        if keyword == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            images.append(image)
            if len(parts) == 3 and parts[1].upper() == "AS":
                names.add(parts[2])
    return [image for image in images if image not in names]


DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "gpu.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_by_full_version(dockerfile):
    for image in base_images(dockerfile):
        assert "latest" not in image and "$" not in image, image
        tag = image.split("@")[0].rsplit(":", 1)[1]
        # A full version (3.11.14, 26.04) in the tag: never a floating 3.11 or a bare name.
        assert re.match(r"^\d+\.\d+(\.\d+)?-", tag), image
    assert "latest" not in dockerfile.read_text().lower()


def test_cpu_image_is_a_pinned_slim_python_311_and_gpu_image_the_pinned_ngc_tag():
    assert base_images(DOCKER / "cpu.Dockerfile") == ["python:3.11.14-slim-bookworm"] * 2
    # the wheel's kernels are compiled in a stage of the same image, against the torch it runs
    assert base_images(DOCKER / "gpu.Dockerfile") == [NGC_TAG] * 2


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_reward_server_serve_as_uid_1000(dockerfile):
    final = stages(dockerfile)[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users == ["1000:1000"]
    entrypoints = [json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert entrypoints == [ENTRYPOINT]
    # USER comes after every RUN and COPY: nothing of the image is written by uid 1000.
    keywords = [keyword for keyword, _ in final]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))


COMPILER = re.compile(r"\b(apt-get|apk|gcc|g\+\+|clang|build-essential|cpp_extension)\b")
WHEEL = "reward_server-0.1.0-*-linux_x86_64.whl"  # the platform wheel hatch_build.py makes
KERNELS_CHECK = "cd / && {python} -m reward_server.pipeline.torch_engine.kernels --check"


def runs(stage: list[tuple[str, str]]) -> str:
    return " ".join(rest for keyword, rest in stage if keyword == "RUN")


def compiled_in_a_build_stage(dockerfile: Path, pip: str, python: str):
    """Assert the image's kernels come in its wheel: compiled in the build stage (the only one with a
    compiler) without build isolation, so against the image's own torch; the wheel installed, then
    checked from / (the installed package, not the source tree). Returns (build, final) stages."""
    build, final = stages(dockerfile)
    assert "apt-get install -y --no-install-recommends g++" in runs(build)
    assert f"{pip} wheel --no-deps --no-build-isolation -w /opt/dist /opt/reward-server" in runs(build)
    commands = f"{runs(build)} {runs(final)}"
    assert f"{pip} install --no-deps /opt/dist/{WHEEL}" in commands  # the wheel, not the tree
    assert commands.index(f"install --no-deps /opt/dist/{WHEEL}") < commands.index(KERNELS_CHECK.format(python=python))
    for _, rest in final:
        assert not COMPILER.search(rest), rest
    return build, final


def test_cpu_image_builds_wheel_kernels_and_checkpoint_in_a_build_stage_and_copies_no_tools():
    # against the venv's pinned torch; the venv the wheel is installed into is what the final stage copies
    build, final = compiled_in_a_build_stage(DOCKER / "cpu.Dockerfile", "/opt/venv/bin/pip", "/opt/venv/bin/python")
    commands = runs(build)
    assert "-r /opt/reward-server/requirements.lock" in commands
    assert commands.index("--check") < commands.index("reward-server demo-checkpoint /models/demo --size small")
    assert [k for k, _ in final if k == "RUN"] == []
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv", "--from=build /models/demo /models/demo"]


def test_gpu_image_compiles_the_kernels_against_its_own_torch_and_adds_packages_without_changing_the_base():
    build, final = compiled_in_a_build_stage(DOCKER / "gpu.Dockerfile", "python3 -m pip", "python3")
    # the container's torch, not the pinned CPU one: build isolation would install that one
    assert "-c /opt/reward-server/requirements.lock hatchling setuptools" in runs(build)
    assert "torch" not in runs(build)
    commands = runs(final)
    assert "pip list --format=freeze --exclude-editable > /tmp/base-constraints.txt" in commands
    assert "-c /tmp/base-constraints.txt -r /opt/reward-server/deploy/docker/gpu-requirements.txt" in commands
    assert ("COPY", "--from=build /opt/dist /opt/dist") in final
    pins = [line for line in (DOCKER / "gpu-requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(re.match(r"^[\w\[\],.-]+==\d", pin) for pin in pins), pins


def test_images_build_their_own_kernels_not_the_hosts():
    """The build context leaves out kernels compiled on the host (another torch, perhaps): the image's
    wheel compiles every instruction set's build itself."""
    for dockerfile in DOCKERFILES:
        patterns = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        assert "reward_server/pipeline/torch_engine/kernels/lib" in patterns
        assert "!hatch_build.py" in patterns


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_passes_the_dockerignore(dockerfile):
    patterns = [line for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
                if line and not line.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:  # last match wins, as in Docker
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negate
        return keep

    for keyword, rest in instructions(dockerfile):
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert included(source), f"{source} is excluded by {dockerfile.name}.dockerignore"
    assert not included(".venv") and not included("tests/conftest.py")


@pytest.mark.parametrize("overlay, image", [("overlays/cpu", "reward-server-cpu"),
                                            ("overlays/gpu", "reward-server-gpu"),
                                            ("overlays/gpu-tp", "reward-server-gpu")])
def test_overlays_run_the_matching_image_and_the_cpu_overlay_its_baked_checkpoint(overlay, image):
    container = server_container(rendered(overlay))
    assert container["image"].rsplit("/", 1)[1].split(":")[0] == image
    if overlay == "overlays/cpu":
        # The checkpoint path the CPU overlay serves is the one the CPU image builds.
        assert "--checkpoint=/models/demo" in container["args"]
        cmd = [json.loads(rest) for keyword, rest in instructions(DOCKER / "cpu.Dockerfile") if keyword == "CMD"]
        assert cmd == [["--checkpoint", "/models/demo"]]
