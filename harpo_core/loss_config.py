"""The knobs of the policy loss and their defaults (no torch: the run configuration reads them).

:mod:`harpo_core.losses` re-exports everything here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

AGGREGATIONS = ("seq-mean-token-mean", "token-mean")
KL_ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True)
class LossConfig:
    """The knobs of :func:`harpo_core.losses.policy_loss`, checked once on construction.

    The single source of these defaults: the run configuration's ``learner`` section takes its
    own from here and validates through this class. ``kl_coef > 0`` needs reference log-probs
    (a frozen reference model); ``tis_cap`` needs the rollouts' own log-probs besides the
    learner's.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: str = "seq-mean-token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    tis_cap: float | None = None  # truncated importance sampling (policy_loss); None: off

    def __post_init__(self):
        checks = [
            ("clip_low", 0 <= self.clip_low < 1, "in [0, 1)"),
            ("clip_high", self.clip_high >= 0, ">= 0"),
            ("aggregation", self.aggregation in AGGREGATIONS, f"one of {AGGREGATIONS}"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("kl_estimator", self.kl_estimator in KL_ESTIMATORS, f"one of {KL_ESTIMATORS}"),
            ("tis_cap", self.tis_cap is None or self.tis_cap >= 1, ">= 1 or None"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {allowed}")

    def kwargs(self) -> dict:
        """The keyword arguments of :func:`harpo_core.losses.policy_loss`."""
        return asdict(self)
