"""Bad input is refused by ``harpo`` before Ray starts, with one message and exit status 2, and
the run directory is left exactly as it was (services/preflight.py, services/cli_run.py)."""

import errno
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services import preflight as preflight_module
from services.cli import main


@pytest.fixture
def assets(tiny_assets, tmp_path):
    """A private copy of the tiny assets, free to damage."""
    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_assets.model_dir, model)
    shutil.copytree(tiny_assets.data_dir, data)
    return model, data


def write_config(tmp_path: Path, model_dir: Path, data_dir: Path, **sections) -> Path:
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "steps": 2},
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_dir), "prompts_per_step": 4},
        "rollout": {"workers": 1, "group_size": 4, "max_new_tokens": 12},
        "learner": {"mini_batch_prompts": 2},
        "observability": {"metrics_port": None},
        "control": {"port": None},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*")}


def refused(capsys, *argv: str) -> tuple[int, str]:
    """Run ``harpo ARGV`` in this process; return (exit status, stderr). Ray must not start.

    Whether the command started (or joined) Ray is seen by wrapping the real
    ``services.cluster.connect``: other tests of the session may have left a Ray instance up,
    so ``ray.is_initialized()`` cannot tell."""
    import services.cluster

    connects = []
    real_connect = services.cluster.connect

    def counted_connect(*args, **kwargs):
        connects.append(args)
        return real_connect(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(services.cluster, "connect", counted_connect)
        try:
            status = main(list(argv))
        except SystemExit as exc:  # argparse
            status = exc.code
    assert not connects, "Ray started before the error"
    return status, capsys.readouterr().err.strip()


def test_set_value_that_is_not_yaml(assets, tmp_path, capsys):
    config = write_config(tmp_path, *assets)
    status, err = refused(capsys, "train", str(config), "--set", "run.steps=[1")
    assert status == 2
    assert err.endswith("harpo train: error: argument --set: 'run.steps=[1': the value '[1' is "
                        "not valid YAML (expected ',' or ']', but got '<stream end>'); quote a "
                        "string, e.g. --set 'run.steps=\"[1\"'")
    assert not (tmp_path / "run").exists()


def test_set_field_below_a_value(assets, tmp_path, capsys):
    config = write_config(tmp_path, *assets)
    status, err = refused(capsys, "train", str(config), "--set", "run.steps.x=3")
    assert (status, err) == (2, "harpo: error: --set run.steps.x: run.steps is a value (2), "
                                "not a section with fields; did you mean --set run.steps=...?")


def test_config_path_is_a_directory(tmp_path, capsys):
    status, err = refused(capsys, "train", str(tmp_path))
    assert (status, err) == (2, f"harpo: error: config file {str(tmp_path)!r} is a directory; "
                                f"give a YAML file (e.g. examples/tiny.yaml)")


def test_truncated_weights(assets, tmp_path, capsys):
    model, data = assets
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    status, err = refused(capsys, "train", str(write_config(tmp_path, model, data)))
    assert status == 2
    assert err == (f"harpo: error: weight file {weights} is unreadable or truncated (Error while "
                   f"deserializing header: incomplete metadata, file not fully covered); copy "
                   f"or download the model again")
    assert not (tmp_path / "run").exists()


def test_deleted_tokenizer_files(assets, tmp_path, capsys):
    model, data = assets
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    status, err = refused(capsys, "train", str(write_config(tmp_path, model, data)))
    assert status == 2
    assert err == (f"harpo: error: no tokenizer files in {model} (expected one of "
                   f"tokenizer.json, tokenizer.model, vocab.json, vocab.txt, spiece.model, "
                   f"sentencepiece.bpe.model); copy the tokenizer into the model directory")


def test_tokenizer_larger_than_the_vocabulary(assets, tmp_path, capsys):
    model, data = assets
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    status, err = refused(capsys, "train", str(write_config(tmp_path, model, data)))
    assert status == 2
    assert err.startswith(f"harpo: error: the tokenizer in {model} has ")
    assert "tokens but the model's vocab_size is 100 (config.json)" in err


def test_model_config_not_json(assets, tmp_path, capsys):
    model, data = assets
    (model / "config.json").write_text("{not json")
    status, err = refused(capsys, "train", str(write_config(tmp_path, model, data)))
    assert status == 2
    assert err == (f"harpo: error: {model / 'config.json'} is not valid JSON (Expecting property "
                   f"name enclosed in double quotes: line 1 column 2 (char 1)); restore the "
                   f"model's config.json")


def test_absurd_group_size(assets, tmp_path, capsys):
    config = write_config(tmp_path, *assets, rollout={"group_size": 1_000_000})
    status, err = refused(capsys, "train", str(config))
    assert status == 2
    assert err.startswith("harpo: error: one rollout request would need about ")
    assert ("rollout.group_size 1000000 × 4 prompts per request (rollout.prompts_per_request, "
            "or data.prompts_per_step / rollout.workers) × (data.max_prompt_tokens 256 + "
            "rollout.max_new_tokens 12) tokens; lower rollout.group_size or "
            "rollout.prompts_per_request") in err


def test_truncated_parquet_names_the_file(assets, tmp_path, capsys):
    model, data = assets
    shard = data / "train-00000-of-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:1000])
    status, err = refused(capsys, "train", str(write_config(tmp_path, model, data)))
    assert status == 2
    assert err == (f"harpo: error: {shard}: not a readable parquet file (Parquet magic bytes not "
                   f"found in footer. Either the file is corrupted or this is not a parquet "
                   f"file.); the file is truncated or corrupt: copy or regenerate it")


def test_missing_data_path(assets, tmp_path, capsys):
    model, _ = assets
    status, err = refused(capsys, "train",
                          str(write_config(tmp_path, model, tmp_path / "nodata")))
    assert (status, err) == (2, f"harpo: error: data path {tmp_path / 'nodata'} does not exist")


def test_data_error_leaves_an_existing_run_directory_alone(assets, tmp_path, capsys):
    model, data = assets
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "config.yaml").write_text("old: config\n")
    before = snapshot(run)
    config = write_config(tmp_path, model, data, data={"tasks": ["chess"]})
    # --overwrite: the new run would replace the old one, but its inputs are checked first
    status, err = refused(capsys, "train", str(config), "--overwrite")
    assert status == 2 and "unknown task(s) ['chess']" in err
    assert snapshot(run) == before


def test_output_dir_is_a_file(assets, tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    config = write_config(tmp_path, *assets, run={"output_dir": str(target)})
    status, err = refused(capsys, "train", str(config))
    assert (status, err) == (2, f"harpo: error: run.output_dir {str(target)!r} cannot be a "
                                f"directory; choose another path or remove the file")
    assert target.read_text() == "x"


def test_output_dir_on_a_read_only_file_system(assets, tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(preflight_module.tempfile, "mkstemp", read_only)
    config = write_config(tmp_path, *assets)
    status, err = refused(capsys, "train", str(config))
    assert (status, err) == (2, f"harpo: error: run.output_dir {str(tmp_path / 'run')!r} is not "
                                f"writable: the file system is read-only (at {tmp_path}); "
                                f"choose another directory")
    assert not list(tmp_path.glob(".harpo-probe-*"))


def test_output_dir_on_a_full_disk(assets, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(preflight_module.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000))
    config = write_config(tmp_path, *assets)
    status, err = refused(capsys, "train", str(config))
    assert status == 2
    assert err.startswith(f"harpo: error: run.output_dir {str(tmp_path / 'run')!r} has 0.0 GiB "
                          f"free, less than one checkpoint needs (about 0.0 GiB: 3 × the "
                          f"model's weights)")


def test_busy_metrics_port(assets, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, *assets,
                              observability={"metrics_host": "127.0.0.1", "metrics_port": port})
        status, err = refused(capsys, "train", str(config))
    assert (status, err) == (2, f"harpo: error: observability.metrics_port {port} on 127.0.0.1 "
                                f"cannot be bound (Address already in use): another process "
                                f"(another harpo run?) uses it; set observability.metrics_port "
                                f"to a free port, 0 (any free port) or null (off)")
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint(assets, tmp_path, capsys):
    write_config(tmp_path, *assets)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((tmp_path / "run.yaml").read_text())
    before = snapshot(run)
    status, err = refused(capsys, "train", "--resume", str(run))
    assert (status, err) == (2, f"harpo: error: no valid checkpoint under {run / 'checkpoints'} "
                                f"to resume from; start the run without --resume")
    assert snapshot(run) == before


def test_eval_checks_the_eval_split(assets, tmp_path, capsys):
    model, data = assets
    (data / "test-00000-of-00001.parquet").unlink()
    status, err = refused(capsys, "eval", str(write_config(tmp_path, model, data)))
    assert status == 2
    assert err.startswith(f"harpo: error: no shards for split 'test' in {data}")


def test_sft_missing_model(assets, tmp_path, capsys):
    _, data = assets
    status, err = refused(capsys, "sft", "--model", "/nonexistent", "--data", str(data),
                          "--out", str(tmp_path / "out"))
    assert (status, err) == (2, "harpo: error: --model '/nonexistent' does not exist; build the "
                                "tiny model with `harpo init-tiny DIR` or point --model at a "
                                "Hugging Face model directory")


def test_sft_out_is_a_file(assets, tmp_path, capsys):
    model, data = assets
    out = tmp_path / "out"
    out.write_text("x")
    status, err = refused(capsys, "sft", "--model", str(model), "--data", str(data),
                          "--out", str(out))
    assert (status, err) == (2, f"harpo: error: --out {str(out)!r} cannot be a directory; "
                                f"choose another path or remove the file")


def test_init_tiny_into_a_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("x")
    status, err = refused(capsys, "init-tiny", str(out))
    assert (status, err) == (2, f"harpo: error: init-tiny OUT {str(out)!r} cannot be a "
                                f"directory; choose another path or remove the file")


def test_subprocess_exit_status_and_no_traceback(assets, tmp_path):
    """As a user runs it: one line on stderr, status 2; the traceback only with --debug."""
    model, data = assets
    (model / "config.json").write_text("{not json")
    config = str(write_config(tmp_path, model, data))
    result = subprocess.run([sys.executable, "-m", "services.cli", "train", config],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"harpo: error: {model / 'config.json'} is not valid JSON (Expecting property name "
        f"enclosed in double quotes: line 1 column 2 (char 1)); restore the model's config.json"]
    result = subprocess.run([sys.executable, "-m", "services.cli", "train", config, "--debug"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("harpo ")
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "(default: 600)" in capsys.readouterr().out


def test_run_time_failures_are_one_line_with_status_1():
    from ray import exceptions as rex

    from services.cli_run import explain

    remote = ("Traceback (most recent call last):\n  File \"worker.py\", line 1\n"
              "safetensors_rust.SafetensorError: incomplete metadata")
    actor = rex.ActorDiedError(rex.RayTaskError("__init__", remote, ValueError("x")))
    assert explain(actor, started=True) == (
        "a Ray actor failed: safetensors_rust.SafetensorError: incomplete metadata (run with "
        "--debug for the traceback)", 1)
    assert explain(MemoryError(), started=True)[1] == 1
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
    assert explain(full, started=True) == (
        "the disk is full writing /runs/x/metrics.jsonl; free some space and resume with "
        "`harpo train --resume RUN_DIR`", 1)
    assert explain(ValueError("bad"), started=False) == ("bad", 2)
    assert explain(ValueError("bad"), started=True) == ("bad", 1)
    with pytest.raises(TypeError):  # a bug is not explained away: its traceback shows
        explain(TypeError("bug"), started=True)


def test_result_tables():
    from services.cli_run import format_eval, format_task_table

    row = {"reward": {"b": 0.5, "a": 1.0}, "accuracy": {"a": 1.0, "b": 0.25},
           "format": {"a": 1.0, "b": 0.5}, "task_factor": {"a": 0.8, "b": 1.25}}
    assert format_task_table(row, {"a": "qa", "b": "classification"}).splitlines() == [
        "task            type             reward accuracy  format  factor",
        "----------------------------------------------------------------",
        "a               qa                1.000    1.000   1.000   0.800",
        "b               classification    0.500    0.250   0.500   1.250"]
    result = {"reward": row["reward"], "accuracy": row["accuracy"],
              "reward_format": row["format"], "rollouts": {"a": 2, "b": 2}}
    lines = format_eval(result).splitlines()
    assert lines[0] == "task             reward accuracy  format rollouts"
    assert lines[2] == "a                 1.000    1.000   1.000        2"
    assert lines[-1] == "mean              0.750"


def test_learner_memory_estimate_follows_the_token_budget_and_the_logit_chunk():
    from services.config import parse_config
    from services.preflight import estimate_memory

    model = {"vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24}

    def estimate(**learner):
        data = {"path": "d", "max_prompt_tokens": 512, "prompts_per_step": 8}
        config = parse_config({"model": {"path": "m"}, "data": data,
                               "rollout": {"max_new_tokens": 512}, "learner": learner})
        return estimate_memory(config, model)

    # 8 prompts x 5 responses of 1024 tokens in one pass: the logits dominate
    whole = estimate()
    assert whole["learner_pass_tokens"] == 40 * 1024
    assert whole["learner_pass"] == 40 * 1024 * (3 * 151936 + 4 * 24 * 896) * 4
    budget = estimate(micro_batch_tokens=4096)
    assert budget["learner_pass_tokens"] == 4096 and budget["learner_sequences"] == 40
    assert budget["learner_pass"] == whole["learner_pass"] / 10
    chunked = estimate(micro_batch_tokens=4096, logprob_chunk_tokens=512)
    assert chunked["learner_pass"] == (512 * 3 * 151936 + 4096 * 4 * 24 * 896) * 4
    # a budget below one row: a row still goes whole
    assert estimate(micro_batch_tokens=100)["learner_pass_tokens"] == 1024
