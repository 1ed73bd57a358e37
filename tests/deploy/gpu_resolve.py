"""The `.[gpu]` resolve of test_packaging.py, startable as soon as collection ends.

It is ≈ 1 minute of mostly waiting on PyPI (≈ 460 sequential requests), so tests/deploy's
conftest starts it in the background when a test that needs it is selected, and the tests
before it run meanwhile; `result()` waits for it (starting it first if nothing did).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
GPU_DOCKERFILE = ROOT / "deploy/docker/Dockerfile.gpu"
TIMEOUT_S = 600
# glibc of the Ubuntu releases a CUDA base image can carry: the newest manylinux tag it runs
GLIBC = {"ubuntu20.04": (2, 31), "ubuntu22.04": (2, 35), "ubuntu24.04": (2, 39)}

_job: dict = {}


def gpu_image() -> dict:
    """The GPU image's base: CUDA version, Ubuntu release and the Python it installs."""
    parser = DockerfileParser(fileobj=io.BytesIO(GPU_DOCKERFILE.read_bytes()))
    base = parser.parent_images[-1]  # the runtime stage's
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-(?:base|runtime|devel)-"
                         r"(ubuntu\d+\.\d+)", base)
    assert match, f"unexpected GPU base image {base!r}"
    pythons = set(re.findall(r"\bpython3\.(\d+)\b", parser.content))
    assert len(pythons) == 1, f"Dockerfile.gpu installs Pythons 3.{pythons}: expected one"
    return {"base": base, "cuda": (int(match[1]), int(match[2])), "ubuntu": match[3],
            "python": f"3.{pythons.pop()}"}


def platform_args(image: dict) -> list[str]:
    """pip's target flags for the image: every manylinux tag its glibc runs, its Python."""
    major, minor = GLIBC[image["ubuntu"]]
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 16, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return [*(a for t in tags for a in ("--platform", t)), "--python-version", image["python"],
            "--implementation", "cp", "--only-binary=:all:"]


def project_copy(directory: Path) -> Path:
    """The files pip needs for harpo's metadata (no package sources: not needed to resolve)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, directory / name)
    return directory


def command(extra: str, workdir: Path, args: list[str]) -> tuple[list[str], Path]:
    report = workdir / f"report-{extra}.json"
    return ([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
             "--report", str(report), *args, f"{project_copy(workdir / extra)}[{extra}]"],
            report)


def start() -> None:
    """Start `.[gpu]`'s resolve from scratch for the GPU image's platform (once)."""
    if _job:
        return
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_FIND_LINKS", None)  # the registry's answer, not this machine's wheels
    workdir = Path(tempfile.mkdtemp(prefix="harpo-gpu-resolve-"))
    argv, report = command("gpu", workdir, ["--ignore-installed", *platform_args(gpu_image())])
    log = (workdir / "pip.log").open("w+")
    _job.update(argv=argv, report=report, workdir=workdir, log=log, started=time.monotonic(),
                process=subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))


def result() -> tuple[list[str], int, str, Path, float]:
    """(command, exit status, output, report path, seconds since the start) once it is done."""
    start()
    process = _job["process"]
    try:
        process.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - _job["started"])))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _job["log"].seek(0)
    return (_job["argv"], process.returncode, _job["log"].read(), _job["report"],
            time.monotonic() - _job["started"])


def cleanup() -> None:
    if _job:
        if _job["process"].poll() is None:
            _job["process"].kill()
            _job["process"].wait()
        _job["log"].close()
        shutil.rmtree(_job["workdir"], ignore_errors=True)
        _job.clear()
