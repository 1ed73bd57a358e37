"""User-supplied reward functions, named as ``"package.module:function"``.

A user reward function is batched: it is called as
``fn(responses=[...], answers=[...], tasks=[...], **extras)`` and returns one finite
number per response.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import numpy as np

SPEC_FORM = "'package.module:function'"


def load_reward_function(spec: str) -> Callable[..., Any]:
    """Import the callable named by ``spec`` (``"package.module:function"``).

    The part after the colon may be dotted (``"pkg.mod:Class.method"``).
    Raises ValueError for a malformed spec or a missing attribute, TypeError when the
    target is not callable, and ImportError when the module cannot be imported.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward function spec {spec!r} has no ':'; expected {SPEC_FORM}")
    module_name, _, attr_path = (part.strip() for part in spec.partition(":"))
    if not module_name:
        raise ValueError(
            f"reward function spec {spec!r} has an empty module part; expected {SPEC_FORM}"
        )
    if not attr_path:
        raise ValueError(
            f"reward function spec {spec!r} has an empty function part; expected {SPEC_FORM}"
        )

    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a module may fail to import with any exception
        raise ImportError(
            f"cannot import module {module_name!r} for reward function {spec!r}: "
            f"{type(err).__name__}: {err}"
        ) from err

    target: Any = module
    for name in attr_path.split("."):
        if not hasattr(target, name):
            raise ValueError(
                f"reward function {spec!r}: no attribute {attr_path!r} "
                f"(looked up in module {module_name!r})"
            )
        target = getattr(target, name)
    if not callable(target):
        raise TypeError(
            f"reward function {spec!r} is not callable: it is a {type(target).__name__}"
        )
    return target


def _describe(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}:{name}" if module else name


def call_reward_function(
    fn: Callable[..., Any],
    responses: Sequence[str],
    answers: Sequence[str],
    tasks: Sequence[str],
    **extras: Any,
) -> np.ndarray:
    """Call a batched user reward function and check what it returns.

    The result must be a sequence (or 1-D array) of real numbers, one per response,
    all finite. Returns it as a float64 array.
    """
    n = len(responses)
    result = fn(responses=responses, answers=answers, tasks=tasks, **extras)
    name = _describe(fn)

    if isinstance(result, np.ndarray):
        if result.ndim != 1 or result.dtype.kind not in "biuf":
            raise TypeError(
                f"reward function {name} must return a 1-D sequence of real numbers, "
                f"got an array of shape {result.shape} and dtype {result.dtype}"
            )
    elif isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        raise TypeError(
            f"reward function {name} must return a sequence of numbers, got {type(result).__name__}"
        )
    if len(result) != n:
        raise ValueError(
            f"reward function {name} must return one reward per response: "
            f"expected {n} got {len(result)}"
        )
    if not isinstance(result, np.ndarray):
        for index, value in enumerate(result):
            if not isinstance(value, Real):
                raise TypeError(
                    f"reward function {name} returned a non-number at sample "
                    f"index {index}: {value!r}"
                )

    rewards = np.asarray(result, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        index = int(bad[0])
        raise ValueError(
            f"reward function {name} returned a non-finite reward at sample index "
            f"{index}: {float(rewards[index])}"
        )
    return rewards
