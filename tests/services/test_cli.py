"""The ``harpo`` console script, run as a user would run it."""

import subprocess
import sys

import pytest


def harpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("mode", ["exclude", "floor"])
def test_simulate_prints_a_factor_per_task(mode):
    result = harpo("simulate", "--steps", "40", "--zero-signal", mode)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"zero_signal={mode}" in lines[0]
    rows = [line.split() for line in lines if line.startswith(("binary", "multi", "qa", "long"))]
    assert [r[0] for r in rows] == ["binary_easy", "binary_hard", "multiclass",
                                    "qa_similarity", "long_context"]
    factors = [float(r[5]) for r in rows]
    assert all(0.5 <= f <= 4.0 for f in factors)
    assert max(factors) > 1.05 and min(factors) < 0.95  # the factors moved apart


def test_bad_arguments_name_the_problem():
    result = harpo("simulate", "--steps", "0")
    assert result.returncode == 2
    assert "argument --steps: expected a positive integer, got 0" in result.stderr
    result = harpo("demo", "--eval-prompts", "0")
    assert result.returncode == 2
    assert "argument --eval-prompts: expected a positive integer, got 0" in result.stderr
    result = harpo("simulate", "--zero-signal", "drop")
    assert "invalid choice: 'drop'" in result.stderr
    assert harpo().returncode == 2


def test_the_control_commands_do_not_import_the_main_cli():
    """``services.cli`` builds its parser from ``services.control.cli``; the reverse import
    would be a cycle, so the shared argument types live in ``services.cli_args``."""
    code = ("import sys, services.control.cli; "
            "assert 'services.cli' not in sys.modules, 'services.control.cli imports services.cli'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
