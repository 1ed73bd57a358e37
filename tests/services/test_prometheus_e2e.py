"""A real training job scraped by a real Prometheus: the series carry the values the run's
metrics.jsonl records, every Grafana panel query returns data, and the alert rules load.

No Grafana server can run here, so the dashboard is checked the way Grafana would use it: each
panel's PromQL, with its variables filled in, against a Prometheus that scraped the job.
"""

import json
import math
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from services.controller import Trainer
from services.ports import free_port
from tests.deploy.helpers import DASHBOARD_JSON, RULES, dashboard_builder, require_binary
from tests.services.conftest import tiny_config

pytestmark = pytest.mark.slow

STEPS = 3



class Prometheus:
    """A Prometheus server on loopback that scrapes one target every second."""

    def __init__(self, workdir, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        parsed = urllib.parse.urlsplit(target)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "harpo-e2e",
                "honor_labels": True,  # keep the exporter's job label (the training run)
                "metrics_path": parsed.path,
                "static_configs": [{"targets": [parsed.netloc]}],
            }],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [require_binary("prometheus"), f"--config.file={config_path}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self._wait(lambda: self._get("/-/ready") is not None, "Prometheus to be ready", 60)

    def _get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.read()
        except OSError:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prometheus exited with {self.process.returncode}; see "
                                   f"{self.log.name}") from None
            return None

    def api(self, path: str, **params) -> dict:
        body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert body is not None, f"no answer from Prometheus for {path} {params}"
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.5)

    def wait_for(self, promql: str, what: str, timeout: float = 60) -> list[dict]:
        results = []

        def found():
            results[:] = self.query(promql)
            return bool(results)

        self._wait(found, what, timeout)
        return results

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    """Starts Prometheus on demand for a target; always stops it."""
    servers = []

    def start(target: str) -> Prometheus:
        servers.append(Prometheus(tmp_path / "prometheus", target))
        return servers[-1]

    (tmp_path / "prometheus").mkdir()
    yield start
    for server in servers:
        server.stop()


def test_prometheus_sees_the_run_and_every_panel_has_data(ray_cluster, tiny_assets, tmp_path,
                                                          prometheus):
    run_dir = tmp_path / "run"
    config = tiny_config(
        tiny_assets, run_dir, run={"steps": STEPS, "checkpoint_every": 0},
        observability={"progress": "never", "metrics_port": 0, "metrics_host": "127.0.0.1"},
        learner={"kl_coef": 0.01})  # a reference model, so the KL panel has a series
    trainer = Trainer(config)
    try:
        endpoint = json.loads((run_dir / "endpoints.json").read_text())["metrics"]
        server = prometheus(endpoint)  # scraping from before the first step
        server.wait_for('up{job="harpo-e2e"} == 1', "the first scrape of the job")
        trainer.run()
        job = config.run.name
        # wait for a scrape after the last step
        server.wait_for(f'harpo_steps_total{{job="{job}"}} == {STEPS}', "the last step")

        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        last = rows[-1]
        assert last["step"] == STEPS - 1
        for metric, field in (("harpo_task_factor", "task_factor"),
                              ("harpo_task_log_factor", "task_log_factor"),
                              ("harpo_task_signal_ema", "task_signal_ema"),
                              ("harpo_task_reward", "reward")):
            # a task keeps the value of the last step whose batch held it
            expected = {}
            for row in rows:
                expected.update(row.get(field) or {})
            series = {r["metric"]["task"]: float(r["value"][1])
                      for r in server.query(f'{metric}{{job="{job}"}}')}
            assert set(series) == set(expected) and set(last[field]) <= set(series), metric
            for task, value in expected.items():
                assert series[task] == pytest.approx(value, rel=1e-9, abs=0), (metric, task)
        log_factors = {}
        for row in rows:
            log_factors.update(row["task_log_factor"])
        for r in server.query(f'harpo_task_factor_unclamped{{job="{job}"}}'):
            expected = math.exp(log_factors[r["metric"]["task"]])
            assert float(r["value"][1]) == pytest.approx(expected, rel=1e-9)
        (loss,) = server.query(f'harpo_loss{{job="{job}"}}')
        assert float(loss["value"][1]) == pytest.approx(last["loss"], rel=1e-9)

        builder = dashboard_builder()
        empty = []
        for title, expr in builder.panel_queries(json.loads(DASHBOARD_JSON.read_text())):
            # a window that holds the whole run, so rates see every step
            promql = builder.concrete_query(expr, job=job, interval="5m")
            values = [float(r["value"][1]) for r in server.query(promql)]
            if not any(math.isfinite(v) for v in values):  # NaN alone draws nothing
                empty.append(f"{title}: {promql} -> {values}")
        assert not empty, "panel queries without data:\n" + "\n".join(empty)

        groups = server.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert rules and all(rule["health"] == "ok" for rule in rules), rules
        firing = [a for a in server.api("alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, firing
    finally:
        trainer.shutdown()
