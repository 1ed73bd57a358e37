"""The text task suites ``harpo init-tiny --suite NAME`` can build, by name.

Each is a module with ``SUITE`` (task name -> spec with a ``think`` text), ``write_suite``,
``suite_fingerprint`` and ``suite_corpus``. Task names are unique across suites, so the warm
start finds a task's SFT target by its name alone.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DEFAULT_SUITE = "default"
SUITES = {DEFAULT_SUITE: "services.tiny.tasks", "imbalance": "services.tiny.imbalance"}


def check_suite(name: str) -> str:
    """``name`` if it names a suite, else a ValueError listing the suites."""
    if name not in SUITES:
        raise ValueError(f"unknown task suite {name!r}; the suites are {sorted(SUITES)}")
    return name


def suite_module(name: str) -> ModuleType:
    return importlib.import_module(SUITES[check_suite(name)])


def sft_response(answer: str, task: str | None = None) -> str:
    """Target completion of the warm start, ``<think>…</think> \\boxed{answer}``, with the
    reasoning text of the task ``task`` of whichever suite holds it (a generic one for a task
    no suite holds)."""
    think = "find the cue"
    for name in SUITES:
        spec = suite_module(name).SUITE.get(task)
        if spec is not None:
            think = spec.think
            break
    return f"<think>{think}</think> \\boxed{{{answer}}}"
