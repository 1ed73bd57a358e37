"""HARPO's modulation on top of another estimator (``harpo_on``), and which bases it accepts.

``harpo`` is GRPO followed by HARPO's task and sample factors; ``harpo_on`` takes the first
half from any stateless registered estimator instead (``base``), so a study can ask whether
the modulation helps an estimator other than GRPO.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from harpo_core.batch import GroupedBatch
from harpo_core.estimators import (
    _REGISTRY,
    Harpo,
    _harpo_signature,
    _parameters,
    register_estimator,
)

# Bases HARPO's modulation can sit on, and why the others are refused.
_NOT_A_BASE = {
    "harpo": "HARPO on HARPO modulates twice",
    "harpo_on": "HARPO on HARPO modulates twice",
    "ema_grpo": "its per-task std is state across steps, which HARPO's task factor replaces",
    "mt_grpo": "HARPO's task factor would undo MT-GRPO's task weights (both set the per-task "
               "scale)",
    "gdpo": "it needs the reward's components, which the modulated estimator does not pass on",
}


def _modulation_base(name: str, **available) -> tuple[Callable, dict]:
    """The stateless registered estimator HARPO modulates, ``fn(batch, **kwargs)``, and the
    parameters it takes among ``available`` (eps, std_ddof)."""
    if not isinstance(name, str) or name not in _REGISTRY or name in _NOT_A_BASE:
        why = f": {_NOT_A_BASE[name]}" if name in _NOT_A_BASE else ""
        bases = sorted(n for n, t in _REGISTRY.items()
                       if n not in _NOT_A_BASE and not inspect.isclass(t))
        raise ValueError(f"harpo: base {name!r} cannot be modulated{why}; a base is one of "
                         f"{bases}")
    fn = _REGISTRY[name]
    takes = _parameters(fn)[0]
    kwargs = {k: v for k, v in available.items() if k in takes}
    return fn, kwargs


@register_estimator("harpo_on")
class HarpoOn(Harpo):
    """HARPO's modulation on top of another stateless estimator: ``base`` (default ``grpo``,
    which makes this ``harpo``) gives ``Â``, the modulator rescales it exactly as for GRPO.

    Whether that is meaningful depends on the base (README, "Is HARPO right for my data?"):
    ``dr_grpo``, ``rloo`` and ``gpg`` keep each task's reward scale in ``Â``, so the task
    factor has real work to do (it equalises the tasks' mean ``|Â|``, which GRPO's std does
    only per group); ``reinforce_pp_baseline`` whitens over the batch, and the modulation
    after it rebalances tasks within that one scale; ``g2rpo`` already gives every group of a
    given size and tie pattern the same ``|Â|``, so the factors mostly follow the tasks'
    share of ties and all-equal groups - largely redundant. Stateful estimators (``ema_grpo``,
    ``mt_grpo``) and ``gdpo`` (which needs the reward's components) are refused as bases.
    """

    name = "harpo_on"

    def __init__(self, base: str = "grpo", **kwargs):
        super().__init__(**kwargs)
        self.base = base
        self._fn, self._kwargs = _modulation_base(base, eps=self.eps, std_ddof=self.std_ddof)

    def base_advantages(self, batch: GroupedBatch) -> np.ndarray:
        return self._fn(batch, **self._kwargs)


HarpoOn.__init__.__signature__ = _harpo_signature(("base",))
