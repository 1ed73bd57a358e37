"""Bad models, data and commands are refused with a clear message before any actor starts."""

import subprocess
import sys

import pytest
import yaml

from services.controller import Trainer
from services.prompts import DataError
from tests.services.conftest import tiny_config


def test_missing_model_directory(tiny_assets, tmp_path):
    config = tiny_config(tiny_assets, tmp_path / "run")
    config = config.model_copy(update={"model": config.model.model_copy(
        update={"path": tmp_path / "no-model"})})
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face model directory"):
        Trainer(config)


def test_prompts_longer_than_allowed(tiny_assets, tmp_path):
    config = tiny_config(tiny_assets, tmp_path / "run", data={"max_prompt_tokens": 20})
    with pytest.raises(DataError, match=r"train prompt\(s\) exceed data.max_prompt_tokens=20: "
                                        r"row \d+ \(\d+ tokens\)"):
        Trainer(config)


def test_prompt_plus_response_beyond_the_context(tiny_assets, tmp_path):
    config = tiny_config(tiny_assets, tmp_path / "run", data={"max_prompt_tokens": 500},
                         rollout={"max_new_tokens": 100})
    with pytest.raises(ValueError, match="= 600 exceeds the model's context of 512 tokens"):
        Trainer(config)


def test_unknown_task_name(tiny_assets, tmp_path):
    config = tiny_config(tiny_assets, tmp_path / "run", data={"tasks": ["parity", "chess"]})
    with pytest.raises(ValueError, match="chess"):
        Trainer(config)


def test_resume_without_checkpoint(tiny_assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="no valid checkpoint under"):
        Trainer(tiny_config(tiny_assets, tmp_path / "run"), resume=True)


def test_cli_reports_config_errors(tiny_assets, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tiny_assets.model_dir)},
                                    "data": {"path": str(tiny_assets.data_dir)},
                                    "rollout": {"group_size": 1}}))
    result = subprocess.run([sys.executable, "-m", "services.cli", "train", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "rollout.group_size: Input should be greater than or equal to 2 (got 1)" in (
        result.stderr)
    result = subprocess.run([sys.executable, "-m", "services.cli", "train"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs a CONFIG file" in result.stderr
