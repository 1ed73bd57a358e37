"""End to end through Ray's Job Submission API: a real head (`ray start --head` on loopback, its
own temp dir and ports), `harpo submit --follow` of a 2-step job with the vLLM (CPU) rollout
backend, its metrics.jsonl, `harpo logs`
and `harpo stop`; then the head's processes are stopped (by their temp dir, so the test
session's own embedded Ray is left alone).
"""

import importlib.util
import json
import subprocess
import tempfile
import time

import psutil
import pytest
import yaml

from services.ports import free_port
from tests.services.conftest import tiny_config
from tests.services.ray_cli import BIN, subprocess_env


def _harpo(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "harpo"), *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_head():
    # Short path: Ray's unix socket paths must stay under 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="hj-", dir="/tmp")
    dashboard = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dashboard), "--num-cpus", "8", "--temp-dir", temp_dir,
           # not the default 52365: the test session's own Ray may hold it
           "--dashboard-agent-listen-port", str(free_port()),
           "--include-dashboard", "true", "--disable-usage-stats"]
    subprocess.run(cmd, env=subprocess_env(), check=True, capture_output=True, timeout=180)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 60
        while True:  # the Jobs API comes up a moment after `ray start` returns
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        victims = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(temp_dir in part for part in proc.info["cmdline"] or []):
                    victims.append(proc)
            except psutil.Error:
                pass
        for proc in victims:
            proc.terminate()
        _, alive = psutil.wait_procs(victims, timeout=15)
        for proc in alive:
            proc.kill()


def test_submit_follow_logs_and_stop(ray_head, tiny_assets, tmp_path):
    assert importlib.util.find_spec("vllm"), "vLLM missing: pip install '.[cpu]' (make test)"
    config = tiny_config(tiny_assets, tmp_path / "run", run={"steps": 2, "name": "submitted"},
                         rollout={"backend": "vllm"})
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    done = _harpo("submit", str(config_file), "--address", ray_head, "--follow")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = done.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"job {job}: SUCCEEDED" in done.stdout
    assert "# resolved configuration" in done.stdout  # the job's own output came through

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["rollouts"] == 16
    # the vLLM workers served the learner's weights: rollout and learner log-probs agree
    assert all(r["logprob_mismatch_max"] < 1e-4 for r in rows)

    logs = _harpo("logs", job, "--address", ray_head)
    assert logs.returncode == 0 and "finished step 2/2" in logs.stdout
    assert f"job {job}: SUCCEEDED" in logs.stdout
    stop = _harpo("stop", job, "--address", ray_head)
    assert stop.returncode == 0 and "already ended (SUCCEEDED)" in stop.stdout


def test_job_commands_explain_bad_requests(ray_head, tmp_path):
    unknown = _harpo("logs", "raysubmit_nope", "--address", ray_head)
    assert unknown.returncode == 2 and "no job 'raysubmit_nope'" in unknown.stderr
    nobody = _harpo("logs", "x", "--address", f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == 2 and "no Ray Jobs API answers at" in nobody.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: /nowhere}\ndata: {path: /nowhere}\nrollout: {workers: 0}\n")
    refused = _harpo("submit", str(bad), "--address", ray_head)
    assert refused.returncode == 2 and "rollout.workers" in refused.stderr
