"""The imbalance suite (``services/tiny/imbalance.py``, docs/imbalance_suite.md): generated from a
seed, fingerprinted, each task's knob real; ``harpo init-tiny --suite imbalance`` writes it and a
bad suite name is refused. Pure tests, except the one init-tiny build (a tiny tokenizer and
model, a few seconds)."""

import dataclasses
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from harpo_core.rewards import RewardComposer, RewardConfig
from services.cli import main
from services.tiny import imbalance, tasks
from services.tiny.imbalance import SUITE, generate_examples, suite_fingerprint, write_suite
from services.tiny.imbalance_rewards import (
    hairline_judge_reward,
    hairline_reward,
    scaled_reward,
)
from services.tiny.suites import sft_response


def boxed(answer: str, think: str = "x") -> str:
    return f"<think>{think}</think> \\boxed{{{answer}}}"


def test_examples_are_fixed_by_the_seed():
    for task in SUITE.values():
        assert generate_examples(task, 20, 7) == generate_examples(task, 20, 7)
        assert generate_examples(task, 20, 7) != generate_examples(task, 20, 8)


def test_the_fingerprint_follows_the_spec_and_differs_from_the_default_suites():
    base = suite_fingerprint()
    assert base == suite_fingerprint(seed=0) != suite_fingerprint(seed=1)
    assert base != tasks.suite_fingerprint()
    changed = [dataclasses.replace(t, train_fraction=0.5) if t.name == "rare" else t
               for t in SUITE.values()]
    assert suite_fingerprint(tasks=changed) != base  # the data-share knob is in it
    relabelled = [dataclasses.replace(t, think="other") if t.name == "solved" else t
                  for t in SUITE.values()]
    assert suite_fingerprint(tasks=relabelled) != base
    assert not set(SUITE) & set(tasks.SUITE)  # task names are unique across suites


def test_hairline_rewards_differ_by_at_most_1e_3_and_lean_to_the_right_answer():
    rows = generate_examples(SUITE["hairline"], 200, 0)
    answers = [r["answer"] for r in rows]
    wrong = {"vowel": "consonant", "consonant": "vowel"}
    # responses that differ in their reasoning: the noise half is a hash of the whole text
    responses = ([boxed(a, f"r{k}") for k, a in enumerate(answers)]
                 + [boxed(wrong[a], f"w{k}") for k, a in enumerate(answers)]
                 + ["no box at all", "", boxed("banana")])
    r = hairline_reward(responses, answers + answers + answers[:3])
    assert r.max() - r.min() <= 1e-3 and np.all(np.abs(r - 0.5) <= 5e-4)
    assert np.unique(r).size == r.size  # the noise half: right answers still differ
    right, bad = r[:200].mean(), r[200:400].mean()
    assert 4e-4 < right - bad < 6e-4  # the right/wrong half: 2 x 2.5e-4, noise averaged out
    assert np.array_equal(hairline_reward(responses, answers * 2 + answers[:3]), r)


def test_the_hairline_judge_scores_one_response_differently_by_its_place_in_the_batch():
    same = [boxed("vowel")] * 6  # a confident policy's group: one response six times
    assert np.unique(hairline_reward(same, ["vowel"] * 6)).size == 1  # silent for GRPO
    judged = hairline_judge_reward(same, ["vowel"] * 6)
    assert np.unique(judged).size == 6 and judged.max() - judged.min() <= 1e-3
    assert np.all(np.abs(judged - 0.5) <= 5e-4) and np.all(judged > 0.5 - 2.5e-4)  # right
    assert np.array_equal(hairline_judge_reward(same, ["vowel"] * 6), judged)  # reproducible
    wrong = hairline_judge_reward([boxed("consonant")] * 200, ["vowel"] * 200)
    assert np.all(wrong < 0.5 + 2.5e-4) and 0.4997 < wrong.mean() < 0.4998


def test_the_scaled_reward_is_graded_in_0_to_10():
    responses = [boxed("7"), boxed("8"), boxed("5"), boxed("3"), boxed("seven"), "7", boxed("11")]
    np.testing.assert_allclose(scaled_reward(responses, ["7"] * 7),
                               [10.0, 7.5, 5.0, 0.0, 0.0, 0.0, 0.0])
    answers = [r["answer"] for r in generate_examples(SUITE["scaled"], 200, 0)]
    assert {int(a) for a in answers} <= set(range(10))


def test_the_reward_composer_scores_the_suites_custom_types_through_reward_custom():
    composer = RewardComposer(RewardConfig(custom=dict(imbalance.CUSTOM_REWARDS),
                                           format_weight=0.2))
    result = composer.score([boxed("vowel"), boxed("4")], ["vowel", "4"],
                            ["hairline", "scaled"], np.array([10, 10]))
    hair, scaled = result.components["task"]
    assert hair == hairline_judge_reward([boxed("vowel")], ["vowel"])[0] and abs(hair - 0.5) <= 5e-4
    assert scaled == 10.0 and result.total[1] == pytest.approx(0.8 * 10 + 0.2 * 1.0)


def test_rare_hard16_and_longans_turn_their_knobs(tmp_path):
    write_suite(tmp_path, n_train_per_task=100, n_test_per_task=10, seed=0)
    train = Counter(pq.read_table(tmp_path / "train-00000-of-00001.parquet")["task"].to_pylist())
    test = Counter(pq.read_table(tmp_path / "test-00000-of-00001.parquet")["task"].to_pylist())
    assert train["rare"] == 20 and all(train[t] == 100 for t in SUITE if t != "rare")
    assert train["rare"] / sum(train.values()) == pytest.approx(0.038, abs=1e-3)  # about 4 %
    assert set(test.values()) == {10}  # measured on as many prompts as any task
    manifest = json.loads((tmp_path / "suite.json").read_text())
    assert manifest["suite"] == "imbalance" and manifest["fingerprint"] == suite_fingerprint()
    assert manifest["reward_custom"] == imbalance.CUSTOM_REWARDS

    hard = generate_examples(SUITE["hard16"], 400, 0)
    assert len(SUITE["hard16"].labels) == 16 and {r["answer"] for r in hard} == set(
        SUITE["hard16"].labels)
    for r in hard:  # the right cue and three distractors of other classes; the ordinal decides
        heard = sorted((r["prompt"].index(s), s) for s in imbalance.SOUNDS.values()
                       if s in r["prompt"])
        k = next(i for i, o in enumerate(imbalance.ORDINALS) if f"the {o} sound" in r["prompt"])
        assert len(heard) == 4 and heard[k][1] == imbalance.SOUNDS[r["answer"]]

    def words(task, key):
        return np.mean([len(r[key].split()) for r in generate_examples(SUITE[task], 50, 0)])

    assert words("hard16", "prompt") > 3 * max(words(t, "prompt") for t in SUITE
                                               if t != "hard16")
    assert words("longans", "answer") > 5 * max(words(t, "answer") for t in SUITE
                                                if t != "longans")
    assert sft_response("night", "solved") == "<think>look at the sky</think> \\boxed{night}"


def test_init_tiny_writes_the_imbalance_suite(tmp_path, capsys):
    out = tmp_path / "assets"
    args = ["init-tiny", str(out), "--suite", "imbalance", "--train-per-task", "20",
            "--test-per-task", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reward.custom" in printed and "imbalance_rewards:scaled_reward" in printed
    manifest = json.loads((out / "data" / "suite.json").read_text())
    assert manifest["fingerprint"] == suite_fingerprint()
    assert [t["name"] for t in manifest["tasks"]] == list(SUITE)
    marker = json.loads((out / "tiny_assets.json").read_text())
    assert marker["params"]["suite"] == "imbalance"
    assert marker["suite_fingerprint"] == suite_fingerprint()
    assert main(args) == 0  # built by the same arguments: reused
    # the default suite into it is another build: refused, nothing changed
    assert main(["init-tiny", str(out), "--train-per-task", "20", "--test-per-task", "4"]) == 2
    assert "built with" in capsys.readouterr().err
    assert json.loads((out / "data" / "suite.json").read_text()) == manifest


def test_init_tiny_refuses_an_unknown_suite(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["init-tiny", str(tmp_path / "x"), "--suite", "imbalanced"])
    assert exit_info.value.code == 2
    assert ("argument --suite: unknown task suite 'imbalanced'; the suites are "
            "['default', 'imbalance']") in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_init_tiny_refuses_a_text_suite_with_omni(tmp_path, capsys):
    assert main(["init-tiny", str(tmp_path / "x"), "--suite", "imbalance", "--omni"]) == 2
    assert ("--omni builds the image/audio/video suite; --suite imbalance is a text suite"
            in capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_a_custom_task_has_no_accuracy_rather_than_accuracy_zero():
    """The custom types define no accuracy (NaN per rollout): the per-task accuracy leaves them
    out instead of reporting 0, while reward keeps every task."""
    from services.step_record import per_task_means

    composer = RewardComposer(RewardConfig(custom=dict(imbalance.CUSTOM_REWARDS)))
    result = composer.score([boxed("4"), boxed("5"), boxed("4")], ["4", "4", "4"],
                            ["scaled", "scaled", "classification"], np.array([10, 10, 10]))
    codes, names = np.array([0, 0, 1]), ("scaled", "sums")
    assert np.isnan(result.accuracy[:2]).all()
    accuracy = per_task_means(codes, result.accuracy, names, skip_undefined=True)
    assert accuracy == {"sums": 1.0}
    assert per_task_means(codes, result.accuracy, names) == {"scaled": 0.0, "sums": 1.0}
    assert set(per_task_means(codes, result.total, names)) == {"scaled", "sums"}
