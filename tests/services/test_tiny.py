"""The tiny demo assets: synthetic task suite, byte-level tokenizer, Qwen2 model, SFT."""

import dataclasses
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from harpo_core.data import load_prompts  # noqa: E402
from harpo_core.rewards.parsing import extract_boxed, follows_format  # noqa: E402
from services.tiny import (  # noqa: E402
    SUITE,
    count_parameters,
    generate_examples,
    greedy_eval,
    init_tiny,
    sft,
    sft_response,
    suite_corpus,
    suite_fingerprint,
    train_tokenizer,
    write_suite,
)

COLUMNS = ["prompt", "answer", "task", "dataset", "task_type", "modality"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("tiny"), n_train_per_task=40, n_test_per_task=4)


def test_suite_is_heterogeneous():
    types = {t.task_type for t in SUITE.values()}
    n_labels = {len(t.labels) for t in SUITE.values() if t.labels}
    assert len(SUITE) >= 6 and types == {"classification", "qa"}
    assert min(n_labels) == 2 and max(n_labels) >= 8
    assert {t.difficulty for t in SUITE.values()} == {"easy", "hard"}


@pytest.mark.parametrize("name", sorted(SUITE))
def test_generation_is_seeded_and_answers_are_valid(name):
    task = SUITE[name]
    rows = generate_examples(task, 50, seed=3)
    assert rows == generate_examples(task, 50, seed=3)
    assert rows != generate_examples(task, 50, seed=4)
    for row in rows:
        assert row["task"] == name and row["task_type"] == task.task_type
        if task.labels:
            assert row["answer"] in task.labels
    if task.labels:  # every class shows up
        assert {r["answer"] for r in generate_examples(task, 400, seed=0)} == set(task.labels)


def test_write_suite_shards_and_manifest(tmp_path):
    shards = write_suite(tmp_path, n_train_per_task=7, n_test_per_task=3, seed=1)
    assert shards == {"train": [tmp_path / "train-00000-of-00001.parquet"],
                      "test": [tmp_path / "test-00000-of-00001.parquet"]}
    for split, per_task in (("train", 7), ("test", 3)):
        table = pq.read_table(shards[split][0])
        assert table.column_names == COLUMNS and table.num_rows == per_task * len(SUITE)
        assert set(table.column("modality").to_pylist()) == {"text"}
    manifest = json.loads((tmp_path / "suite.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == list(SUITE)
    assert all(t["n_train"] == 7 and t["n_test"] == 3 for t in manifest["tasks"])
    train_prompts = set(load_prompts(tmp_path, "train").prompts)
    assert len(train_prompts) > 1


def test_sft_response_parses():
    for task in SUITE.values():
        text = sft_response("a {nested} answer", task)
        assert follows_format(text) and extract_boxed(text) == "a {nested} answer"
    assert not follows_format("\\boxed{x}")


def test_tokenizer_round_trips_through_autotokenizer(assets):
    fresh = train_tokenizer(suite_corpus(), vocab_size=512)
    loaded = AutoTokenizer.from_pretrained(assets.model_dir)
    assert type(loaded) is type(fresh) and type(loaded).__name__ == "Qwen2Tokenizer"
    assert len(loaded) == len(fresh) == 512
    texts = [
        "<think>compare the digits</think> \\boxed{greater}",
        "Is 17 + 4 even? ~!@#$%^&*()_+`-=[]{}|;':\",./<>?\\ \t\n end",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
        "".join(chr(c) for c in range(32, 127)),
    ]
    for text in texts:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == fresh(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(loaded(token, add_special_tokens=False)["input_ids"]) == 1
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>"
    chat = loaded.apply_chat_template([{"role": "user", "content": "Q?"}],
                                      add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


def test_model_loads_and_generates(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    assert 500_000 <= count_parameters(model) <= 1_500_000
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tokenizer)
    eos = set(model.generation_config.eos_token_id)
    assert eos == {tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    enc = tokenizer(["hello"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 5
    assert sorted(p.name for p in assets.model_dir.iterdir() if p.suffix in {".bin", ".pt"}) == []


def test_init_tiny_is_idempotent_and_deterministic(assets, tmp_path):
    root = assets.model_dir.parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert init_tiny(root, n_train_per_task=40, n_test_per_task=4) == assets
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="remove it or choose another directory"):
        init_tiny(root, n_train_per_task=41, n_test_per_task=4)

    other = init_tiny(tmp_path / "again", n_train_per_task=40, n_test_per_task=4)
    for rel in ("model/model.safetensors", "model/tokenizer.json",
                "data/train-00000-of-00001.parquet", "data/suite.json"):
        assert (root / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    assert other.model_dir != assets.model_dir


def test_suite_fingerprint_follows_what_the_generators_produce(assets):
    assert suite_fingerprint() == suite_fingerprint()
    manifest = json.loads((assets.data_dir / "suite.json").read_text())
    assert manifest["fingerprint"] == suite_fingerprint()
    assert suite_fingerprint(seed=1) != suite_fingerprint()
    parity = SUITE["parity"]
    always_even = dataclasses.replace(parity, generate=lambda rng: ("Is 2 even or odd?", "even"))
    assert suite_fingerprint(tasks=[always_even]) != suite_fingerprint(tasks=[parity])
    relabelled = dataclasses.replace(parity, think="look at it")
    assert suite_fingerprint(tasks=[relabelled]) != suite_fingerprint(tasks=[parity])


def test_assets_from_another_suite_version_are_refused_or_replaced(assets, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(assets.model_dir.parent, stale)
    marker = stale / "tiny_assets.json"
    recorded = json.loads(marker.read_text())
    # what a directory written before the suite changed looks like: another fingerprint
    marker.write_text(json.dumps({**recorded, "suite_fingerprint": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="another version of the task suite"):
        init_tiny(stale, n_train_per_task=40, n_test_per_task=4)
    assert (stale / "model" / "model.safetensors").is_file()  # refused, nothing removed
    assert init_tiny(stale, n_train_per_task=40, n_test_per_task=4, replace_stale=True).data_dir \
        == stale / "data"
    assert json.loads(marker.read_text()) == recorded
    for rel in ("model/model.safetensors", "data/test-00000-of-00001.parquet"):
        assert (stale / rel).read_bytes() == (assets.model_dir.parent / rel).read_bytes(), rel


def test_short_sft_lowers_loss_and_saves_safetensors(assets, tmp_path):
    out = tmp_path / "sft"
    metrics = sft(assets.model_dir, assets.data_dir, out, steps=12, batch_size=8, lr=3e-3,
                  warmup_steps=2, seed=0, max_length=256, num_threads=1, progress=False)
    assert metrics["steps"] == 12 and metrics["loss_last"] < 0.8 * metrics["loss_first"]
    assert metrics["suite_fingerprint"] == suite_fingerprint()  # the demo's reuse check
    assert (out / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    report = greedy_eval(out, assets.data_dir, n_per_task=2, max_new_tokens=8, num_threads=1)
    assert set(report) == set(SUITE)
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["format"] <= 1 and r["n"] == 2
               for r in report.values())


def test_sft_is_step_bounded_and_bitwise_reproducible(assets, tmp_path):
    # two threads, as the demo uses: same settings and thread count, same bits
    kwargs = dict(steps=3, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=1, seed=5,
                  num_threads=2)
    first = sft(assets.model_dir, assets.data_dir, tmp_path / "a", **kwargs)
    # a generous time cap must not change anything: the schedule follows the steps only
    second = sft(assets.model_dir, assets.data_dir, tmp_path / "b", max_seconds=3600, **kwargs)
    for metrics in (first, second):
        assert metrics["steps"] == 3 and not metrics["stopped_early"]
        assert metrics["settings"]["steps"] == 3 and metrics["settings"]["seed"] == 5
    assert first["loss_first"] == second["loss_first"]
    assert first["loss_last"] == second["loss_last"]
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    start = load_file(assets.model_dir / "model.safetensors")
    assert any(not a[k].equal(start[k]) for k in a)  # it did train


def test_sft_time_cap_stops_early_and_says_so(assets, tmp_path):
    metrics = sft(assets.model_dir, assets.data_dir, tmp_path / "capped", steps=50,
                  batch_size=4, micro_batch_size=2, warmup_steps=1, num_threads=1,
                  max_seconds=0.0)
    assert metrics["steps"] == 1 and metrics["stopped_early"]  # one step, then the cap
    assert (tmp_path / "capped" / "model.safetensors").is_file()
