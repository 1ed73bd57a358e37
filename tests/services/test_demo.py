"""`harpo demo` as a user runs it: a short version of the whole flow through the console."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_reports_every_task(tmp_path):
    # 10 held-out prompts per task instead of 100: the evaluations before and after are most
    # of the demo's generation at 2 steps
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--workdir", str(tmp_path),
         "--steps", "2", "--sft-steps", "5", "--eval-prompts", "10"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert stage in out
    assert ("4 responses at temperature 1 to each of 10 test prompts (what RL maximises); "
            "greedy = one greedy response to each of 10") in " ".join(out.split())
    table = [line.split() for line in out.splitlines()
             if line.split() and line.split()[0] in
             {"sentiment", "emotion", "compare", "parity", "topic_long", "weather_qa",
              "activity_qa"}]
    assert len(table) == 7
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "step-000002" / "MANIFEST.json").is_file()
    assert (tmp_path / "demo.yaml").is_file()  # the config, reusable with `harpo train`
    sft = json.loads((tmp_path / "sft-model" / "sft_metrics.json").read_text())
    assert sft["steps"] == 5 and not sft["stopped_early"]  # bounded by steps, not by time
