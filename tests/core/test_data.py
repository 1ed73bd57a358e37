"""Shard discovery, prompt loading (and its error messages) and the task-stratified sampler."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harpo_core.data import (
    DataColumns,
    PromptSet,
    TaskStratifiedSampler,
    find_shards,
    load_prompts,
)


def rows(task, n, task_type="classification", start=0, **extra):
    """A column dict of ``n`` valid rows of one task."""
    data = {
        "prompt": [f"{task} prompt {start + i}" for i in range(n)],
        "answer": [f"{task} answer {start + i}" for i in range(n)],
        "task": [task] * n,
        "dataset": [f"{task}_ds"] * n,
        "task_type": [task_type] * n,
    }
    data.update(extra)
    return data


def merge(*parts):
    return {k: sum((p[k] for p in parts), []) for k in parts[0]}


def write(directory, name, columns):
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), directory / name)
    return directory / name


@pytest.fixture
def two_shards(tmp_path):
    write(tmp_path, "train-00000-of-00002.parquet", merge(rows("emo", 3), rows("qa", 2, "qa")))
    write(tmp_path, "train-00001-of-00002.parquet", rows("emo", 2, start=3))
    write(tmp_path, "test-00000-of-00001.parquet", rows("emo", 1))
    return tmp_path


# --- find_shards -------------------------------------------------------------------------------


def test_find_shards_orders_the_split_and_ignores_other_splits(two_shards):
    assert [p.name for p in find_shards(two_shards, "train")] == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [p.name for p in find_shards(two_shards, "test")] == ["test-00000-of-00001.parquet"]


def test_find_shards_accepts_one_file(two_shards):
    file = two_shards / "test-00000-of-00001.parquet"
    assert find_shards(file, "ignored") == [file]


def test_find_shards_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope does not exist"):
        find_shards(tmp_path / "nope", "train")


def test_find_shards_non_parquet_file(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.csv is not a \.parquet file"):
        find_shards(tmp_path / "data.csv", "train")


def test_find_shards_lists_the_parquet_files_that_are_there(two_shards):
    with pytest.raises(FileNotFoundError, match=r"no shards for split 'validation'.*"
                       r"the parquet files there are: test-00000-of-00001\.parquet, train-0"):
        find_shards(two_shards, "validation")


def test_find_shards_says_when_there_is_no_parquet_at_all(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"the directory holds no parquet files"):
        find_shards(tmp_path, "train")


def test_find_shards_names_missing_shards(tmp_path):
    write(tmp_path, "train-00000-of-00003.parquet", rows("a", 1))
    write(tmp_path, "train-00002-of-00003.parquet", rows("a", 1))
    with pytest.raises(FileNotFoundError,
                       match=r"1 of 3 missing: train-00001-of-00003\.parquet$"):
        find_shards(tmp_path, "train")


def test_find_shards_rejects_inconsistent_counts(tmp_path):
    write(tmp_path, "train-00000-of-00002.parquet", rows("a", 1))
    write(tmp_path, "train-00001-of-00003.parquet", rows("a", 1))
    with pytest.raises(ValueError, match=r"disagree on the count: -of-00002: train-00000-of-00002"
                       r"\.parquet; -of-00003: train-00001-of-00003\.parquet"):
        find_shards(tmp_path, "train")


def test_find_shards_rejects_an_index_beyond_the_count(tmp_path):
    write(tmp_path, "train-00000-of-00001.parquet", rows("a", 1))
    write(tmp_path, "train-00001-of-00001.parquet", rows("a", 1))
    with pytest.raises(ValueError, match=r"out of range .*train-00001-of-00001\.parquet"):
        find_shards(tmp_path, "train")


# --- load_prompts ------------------------------------------------------------------------------


def test_load_concatenates_shards_in_order(two_shards):
    ps = load_prompts(two_shards)
    assert len(ps) == 7
    assert ps.prompts == [f"emo prompt {i}" for i in range(3)] + ["qa prompt 0", "qa prompt 1"] + [
        "emo prompt 3", "emo prompt 4"]
    assert ps.answers[3] == "qa answer 0"
    assert ps.task_names == ("emo", "qa")
    assert ps.task_types == ("classification", "qa")
    assert ps.task_codes.dtype == np.int32
    assert ps.task_codes.tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert ps.datasets[0] == "emo_ds"
    assert ps.task_counts() == {"emo": 5, "qa": 2}
    assert ps.indices_of_task(1).tolist() == [3, 4]
    assert ps.extras == {}


def test_load_single_file(two_shards):
    ps = load_prompts(two_shards / "test-00000-of-00001.parquet", split="whatever")
    assert ps.prompts == ["emo prompt 0"] and ps.task_names == ("emo",)


def test_load_other_split(two_shards):
    assert len(load_prompts(two_shards, split="test")) == 1


def test_modality_columns_are_carried_through(tmp_path):
    media = [[b"\x00\x01"], [], [b"x", b"y"]]
    write(tmp_path, "train-00000-of-00001.parquet",
          rows("emo", 3, audios=media, modality_signature=["text_audio", "text", "text_audio"]))
    cols = DataColumns(modality=("audios", "modality_signature", "videos"))
    ps = load_prompts(tmp_path, columns=cols)
    assert ps.extras["audios"] == media
    assert ps.extras["modality_signature"] == ["text_audio", "text", "text_audio"]
    assert ps.extras["videos"] == [None] * 3  # named but absent: None for every row
    assert ps.select([2, 0]).extras["audios"] == [[b"x", b"y"], [b"\x00\x01"]]


def test_columns_are_mapped_through_datacolumns(tmp_path):
    # The Human Behavior Atlas v2 layout: "problem" for the prompt, media lists, no task_type.
    data = rows("emo", 2, videos=[[b"v"], []], images=[[], []], audios=[[b"a"], [b"b"]],
                modality_signature=["text_video_audio", "text_audio"])
    data["problem"] = data.pop("prompt")
    del data["task_type"]
    write(tmp_path, "train-00000-of-00001.parquet", data)
    ps = load_prompts(tmp_path, columns=DataColumns.human_behavior_atlas(),
                      default_task_type={"emo": "classification"})
    assert ps.prompts == ["emo prompt 0", "emo prompt 1"]
    assert ps.task_types == ("classification",)
    assert ps.extras["videos"] == [[b"v"], []]


def test_only_needed_columns_are_read(tmp_path):
    # An unreadable-as-string extra column must not matter when it is not asked for.
    write(tmp_path, "train-00000-of-00001.parquet", rows("emo", 2, junk=[1, 2]))
    assert len(load_prompts(tmp_path)) == 2


def test_missing_required_columns_are_listed_with_the_available_ones(tmp_path):
    data = rows("emo", 2)
    del data["answer"], data["task"]
    file = write(tmp_path, "train-00000-of-00001.parquet", data)
    with pytest.raises(ValueError, match=rf"{file}: missing required column\(s\) \['answer', "
                       r"'task'\]; available columns: \['prompt', 'dataset', 'task_type'\]"):
        load_prompts(tmp_path)


def test_task_type_is_required_unless_a_default_is_given(tmp_path):
    data = rows("emo", 2)
    del data["task_type"], data["dataset"]
    write(tmp_path, "train-00000-of-00001.parquet", data)
    with pytest.raises(ValueError, match=r"\['task_type'\] \(or pass default_task_type=\)"):
        load_prompts(tmp_path)
    ps = load_prompts(tmp_path, default_task_type="classification")
    assert ps.task_types == ("classification",)
    assert ps.datasets == ["emo", "emo"]  # dataset defaults to the task name


def test_default_task_type_mapping_must_cover_every_task(tmp_path):
    data = merge(rows("emo", 1), rows("vqa", 1))
    del data["task_type"]
    write(tmp_path, "train-00000-of-00001.parquet", data)
    with pytest.raises(ValueError, match=r"no entry for task\(s\) \['vqa'\]"):
        load_prompts(tmp_path, default_task_type={"emo": "classification"})
    ps = load_prompts(tmp_path, default_task_type={"emo": "classification", "vqa": "qa"})
    assert ps.task_types == ("classification", "qa")


@pytest.mark.parametrize("column", ["prompt", "answer", "task"])
@pytest.mark.parametrize("bad", [None, "", "   "])
def test_null_or_empty_text_names_file_and_row(tmp_path, column, bad):
    write(tmp_path, "train-00000-of-00002.parquet", rows("emo", 2))
    data = rows("emo", 3)
    data[column][2] = bad
    file = write(tmp_path, "train-00001-of-00002.parquet", data)
    with pytest.raises(ValueError, match=rf"{file}: column '{column}' is null or empty at row 2$"):
        load_prompts(tmp_path)


def test_an_all_null_column_reports_its_rows(tmp_path):
    data = rows("emo", 2)
    data["answer"] = [None, None]  # Arrow gives this column type null
    write(tmp_path, "train-00000-of-00001.parquet", data)
    with pytest.raises(ValueError, match=r"column 'answer' is null or empty at row 0, 1$"):
        load_prompts(tmp_path)


def test_non_string_column_is_rejected(tmp_path):
    data = rows("emo", 2)
    data["answer"] = [1, 2]
    write(tmp_path, "train-00000-of-00001.parquet", data)
    with pytest.raises(ValueError, match=r"column 'answer' has type int64, expected strings"):
        load_prompts(tmp_path)


def test_dictionary_encoded_strings_are_accepted(tmp_path):
    table = pa.table(rows("emo", 2))
    table = table.set_column(2, "task", table.column("task").dictionary_encode())
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    assert load_prompts(tmp_path).task_names == ("emo",)


def test_a_task_with_two_types_is_rejected_naming_both_rows(tmp_path):
    first = write(tmp_path, "train-00000-of-00002.parquet", rows("emo", 2))
    second = write(tmp_path, "train-00001-of-00002.parquet",
                   merge(rows("qa", 1, "qa"), rows("emo", 1, "qa")))
    with pytest.raises(ValueError, match=rf"task 'emo' has rows of task_type 'classification' "
                       rf"\({first}, row 0\) and 'qa' \({second}, row 1\)"):
        load_prompts(tmp_path)


def test_task_type_not_allowed(tmp_path):
    file = write(tmp_path, "train-00000-of-00001.parquet",
                 merge(rows("emo", 1), rows("score", 2, "regression")))
    with pytest.raises(ValueError, match=rf"{file}, row 1: task_type 'regression' of task 'score' "
                       r"is not allowed; allowed: \['classification', 'qa'\]"):
        load_prompts(tmp_path)
    assert load_prompts(tmp_path, task_types_allowed=None).task_types == (
        "classification", "regression")
    assert load_prompts(tmp_path, tasks=["emo"]).task_names == ("emo",)  # checks kept rows only


def test_tasks_filter(two_shards):
    ps = load_prompts(two_shards, tasks=["qa"])
    assert ps.prompts == ["qa prompt 0", "qa prompt 1"]
    assert ps.task_names == ("qa",) and ps.task_codes.tolist() == [0, 0]


def test_tasks_filter_names_unknown_tasks(two_shards):
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['humor'\].*"
                       r"available tasks: \['emo', 'qa'\]"):
        load_prompts(two_shards, tasks=["emo", "humor"])
    with pytest.raises(TypeError, match="not the string"):
        load_prompts(two_shards, tasks="emo")


def test_empty_result_is_an_error(tmp_path, two_shards):
    with pytest.raises(ValueError, match=r"no prompts to load"):
        load_prompts(two_shards, tasks=[])
    write(tmp_path / "empty", "train-00000-of-00001.parquet", rows("emo", 0))  # null-typed
    with pytest.raises(ValueError, match=r"no prompts to load"):
        load_prompts(tmp_path / "empty")


# --- PromptSet ---------------------------------------------------------------------------------


def make_set(sizes):
    """A PromptSet whose task ``t{k}`` has ``sizes[k]`` rows, tasks interleaved."""
    codes = np.concatenate([np.full(s, k) for k, s in enumerate(sizes)]).astype(np.int32)
    codes = codes[np.random.default_rng(0).permutation(codes.size)]
    n = codes.size
    return PromptSet(
        prompts=[f"p{i}" for i in range(n)], answers=[f"a{i}" for i in range(n)],
        task_codes=codes, task_names=tuple(f"t{k}" for k in range(len(sizes))),
        task_types=("classification",) * len(sizes), datasets=["d"] * n)


def test_select_keeps_the_task_vocabulary():
    ps = make_set([3, 2])
    sub = ps.select(ps.indices_of_task(1))
    assert len(sub) == 2 and sub.task_names == ps.task_names
    assert sub.task_counts() == {"t0": 0, "t1": 2}
    assert ps.select(ps.task_codes == 0).task_counts() == {"t0": 3, "t1": 0}
    with pytest.raises(ValueError, match="task code 2 out of range"):
        ps.indices_of_task(2)


def test_promptset_checks_lengths():
    with pytest.raises(ValueError, match="answers has 1 entries but there are 2 prompts"):
        PromptSet(["a", "b"], ["x"], np.zeros(2), ("t",), ("qa",), ["d", "d"])


# --- TaskStratifiedSampler ---------------------------------------------------------------------


def batch_counts(ps, batch):
    return np.bincount(ps.task_codes[batch], minlength=len(ps.task_names))


def test_each_batch_is_balanced_and_rotation_is_fair():
    ps = make_set([7, 3, 5, 11])
    sampler = TaskStratifiedSampler(ps, seed=1)
    total = np.zeros(4, dtype=int)
    for _ in range(50):
        counts = batch_counts(ps, sampler.next_batch(6))  # 6 = 4 * 1 + 2 left over
        assert counts.max() - counts.min() <= 1
        total += counts
        assert total.max() - total.min() <= 1
    assert total.tolist() == [75] * 4


def test_small_batches_cover_every_task_in_turn():
    ps = make_set([4, 4, 4, 4, 4])
    sampler = TaskStratifiedSampler(ps, seed=3)
    seen = [ps.task_codes[sampler.next_batch(2)].tolist() for _ in range(5)]
    assert Counter(code for batch in seen for code in batch) == dict.fromkeys(range(5), 2)
    assert seen[:3] == [[0, 1], [2, 3], [0, 4]]  # grouped by task code within a batch


def test_no_repeats_within_a_task_epoch():
    ps = make_set([5, 3])
    sampler = TaskStratifiedSampler(ps, seed=7)
    streams = {0: [], 1: []}
    for n in [3, 1, 4, 2, 5, 7, 1]:
        for i in sampler.next_batch(n):
            streams[int(ps.task_codes[i])].append(int(i))
    for code, stream in streams.items():
        rows = sorted(ps.indices_of_task(code).tolist())
        size = len(rows)
        epochs = [stream[k:k + size] for k in range(0, len(stream), size)]
        for epoch in epochs[:-1]:
            assert sorted(epoch) == rows
        assert len(set(epochs[-1])) == len(epochs[-1])
    assert len({tuple(streams[0][k:k + 5]) for k in (0, 5)}) == 2  # reshuffled between epochs


def test_a_task_smaller_than_its_share_wraps_into_its_next_epoch():
    ps = make_set([2, 10])
    batch = TaskStratifiedSampler(ps, seed=0).next_batch(10)
    small = [i for i in batch if ps.task_codes[i] == 0]
    assert len(small) == 5 and sorted(small[:2]) == sorted(ps.indices_of_task(0).tolist())


def test_sampler_is_deterministic_and_seed_dependent():
    ps = make_set([6, 9, 4])
    def run(seed):
        sampler = TaskStratifiedSampler(ps, seed)
        return [sampler.next_batch(n).tolist() for n in [5, 2, 8, 1]]
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_sampler_skips_tasks_without_rows():
    ps = make_set([4, 3]).select(np.flatnonzero(make_set([4, 3]).task_codes == 1))
    batch = TaskStratifiedSampler(ps, seed=0).next_batch(3)
    assert sorted(batch.tolist()) == [0, 1, 2]


def test_state_round_trip_through_json_continues_identically():
    ps = make_set([5, 8, 3])
    reference = TaskStratifiedSampler(ps, seed=5)
    interrupted = TaskStratifiedSampler(ps, seed=5)
    sizes = [4, 7, 2, 5, 1, 9, 3, 6]
    for n in sizes[:4]:
        reference.next_batch(n)
        interrupted.next_batch(n)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = TaskStratifiedSampler(ps, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    for n in sizes[4:]:
        np.testing.assert_array_equal(resumed.next_batch(n), reference.next_batch(n))
    assert resumed.state_dict() == reference.state_dict()


def test_the_proportional_mix_follows_the_data_and_never_strays_a_prompt():
    ps = make_set([40, 2, 18])  # shares 2/3, 1/30, 3/10 of the rows
    sampler = TaskStratifiedSampler(ps, seed=4, mix="proportional")
    share = np.array([40, 2, 18]) / 60
    total, batches = np.zeros(3, dtype=int), []
    for step in range(1, 31):
        batch = sampler.next_batch(4)
        batches.append(batch_counts(ps, batch))
        total += batches[-1]
        assert np.abs(total - 4 * step * share).max() < 1.0  # within a prompt of its share
    assert total.tolist() == [80, 4, 36]
    # the rare task is rare in the batches: in 4 of the 30, once each; balanced: in every one
    assert sum(c[1] > 0 for c in batches) == 4 and max(c[1] for c in batches) == 1
    balanced = TaskStratifiedSampler(ps, seed=4)
    assert all(batch_counts(ps, balanced.next_batch(4))[1] >= 1 for _ in range(30))


def test_the_proportional_mix_resumes_from_its_state_and_refuses_the_other_mix():
    ps = make_set([9, 3, 5])
    reference = TaskStratifiedSampler(ps, seed=2, mix="proportional")
    interrupted = TaskStratifiedSampler(ps, seed=2, mix="proportional")
    for n in (5, 3, 7):
        reference.next_batch(n)
        interrupted.next_batch(n)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = TaskStratifiedSampler(ps, seed=0, mix="proportional")
    resumed.load_state_dict(state)
    for n in (4, 6, 1, 8):
        np.testing.assert_array_equal(resumed.next_batch(n), reference.next_batch(n))
    with pytest.raises(ValueError, match="saved with the proportional task mix, this sampler "
                                         r"has the balanced one \(data.task_mix\)"):
        TaskStratifiedSampler(ps, seed=0).load_state_dict(state)
    balanced_state = TaskStratifiedSampler(ps, seed=0).state_dict()
    assert "mix" not in balanced_state and "credit" not in balanced_state  # as before
    with pytest.raises(ValueError, match="saved with the balanced task mix"):
        TaskStratifiedSampler(ps, seed=0, mix="proportional").load_state_dict(balanced_state)
    with pytest.raises(ValueError, match="needs 3 finite credits"):
        TaskStratifiedSampler(ps, seed=0, mix="proportional").load_state_dict(
            {**state, "credit": [0.0, float("nan"), 0.0]})
    with pytest.raises(ValueError, match="mix must be one of"):
        TaskStratifiedSampler(ps, seed=0, mix="uniform")


def test_restoring_onto_different_data_is_refused():
    state = TaskStratifiedSampler(make_set([5, 8]), seed=0).state_dict()
    other = TaskStratifiedSampler(make_set([5, 9]), seed=0)
    with pytest.raises(ValueError, match=r"different prompt set: saved tasks \{'t0': 5, 't1': 8\}"
                       r", current tasks \{'t0': 5, 't1': 9\}"):
        other.load_state_dict(state)


def test_corrupt_state_is_refused():
    ps = make_set([2, 2])
    sampler = TaskStratifiedSampler(ps, seed=0)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="invalid epochs"):
        sampler.load_state_dict({**state, "cursors": [3, 0]})
    with pytest.raises(ValueError, match="rotation_offset 2 out of range"):
        sampler.load_state_dict({**state, "rotation_offset": 2})
    with pytest.raises(ValueError, match="version"):
        sampler.load_state_dict({**state, "version": 0})
    with pytest.raises(ValueError, match=r"lacks \['cursors'\]"):
        sampler.load_state_dict({k: v for k, v in state.items() if k != "cursors"})


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_batch_size(n):
    with pytest.raises(ValueError, match="n_prompts must be positive"):
        TaskStratifiedSampler(make_set([1]), seed=0).next_batch(n)


def test_bad_seed_and_empty_set():
    with pytest.raises(ValueError, match="seed must be non-negative"):
        TaskStratifiedSampler(make_set([1]), seed=-1)
    with pytest.raises(ValueError, match="empty prompt set"):
        TaskStratifiedSampler(make_set([1]).select([]), seed=0)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=8).filter(any),
    batch_sizes=st.lists(st.integers(1, 25), min_size=1, max_size=12),
    seed=st.integers(0, 2**32),
)
def test_balance_property(sizes, batch_sizes, seed):
    ps = make_set(sizes)
    active = np.array(sizes) > 0
    sampler = TaskStratifiedSampler(ps, seed)
    total = np.zeros(len(sizes), dtype=int)
    for n in batch_sizes:
        batch = sampler.next_batch(n)
        assert batch.size == n
        counts = batch_counts(ps, batch)
        assert not counts[~active].any()
        assert counts[active].max() - counts[active].min() <= 1
        total += counts
        assert total[active].max() - total[active].min() <= 1
