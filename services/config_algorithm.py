"""The ``algorithm`` section: which advantage estimator, and its parameters.

HARPO's knobs take their defaults from ``harpo_core.HarpoConfig``; an estimator gets exactly the
section's values it takes (by its signature) plus ``params`` on top, and is built once while the
config is validated, so a parameter it does not take is a config error.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from harpo_core import HarpoConfig, estimator_parameters, make_estimator
from harpo_core.estimators import DEFAULT_EMA_DECAY, DEFAULT_EPS
from harpo_core.modulator import ZeroSignal
from services.config_base import Fraction, Section

_HARPO = HarpoConfig()  # the library's defaults: the single source of HarpoSection's
_HARPO_FIELDS = frozenset(f.name for f in dataclasses.fields(HarpoConfig))


class HarpoSection(Section):
    """HARPO's knobs: ``HarpoConfig``'s fields with its defaults, validated by it as well.

    ``HarpoConfig.history`` (how many steps the modulator can replay) is not a training knob
    and stays at its default here (``algorithm.params`` can still set it).
    """

    beta_rho: Fraction = _HARPO.beta_rho
    beta_s: Fraction = _HARPO.beta_s
    task_clamp: tuple[float, float] | None = _HARPO.task_clamp
    sample_clamp: tuple[float, float] | None = _HARPO.sample_clamp
    zero_signal: ZeroSignal = _HARPO.zero_signal
    signal_floor: Annotated[float, Field(gt=0.0)] = _HARPO.signal_floor

    @model_validator(mode="after")
    def _check_with_core(self):
        self.to_config()  # clamp ordering and friends, one source of truth
        return self

    def to_config(self) -> HarpoConfig:
        return HarpoConfig(**self.model_dump())


class AlgorithmSection(Section):
    # a registered estimator (harpo_core.available_estimators) or "package.module:function"
    estimator: str = "harpo"
    eps: Annotated[float, Field(gt=0.0)] = DEFAULT_EPS
    std_ddof: Literal[0, 1] = 0
    harpo: HarpoSection = Field(default_factory=HarpoSection)
    ema_decay: Fraction = DEFAULT_EMA_DECAY  # ema_grpo's ``decay``
    # more estimator parameters (a user estimator's, say); they override the fields above
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, value: str) -> str:
        estimator_parameters(value)  # a registered name, or a spec that imports
        return value

    @field_validator("params")
    @classmethod
    def _estimator_builds(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Build the estimator once, so a parameter it does not take is a config error."""
        if "modulator" in params:
            raise ValueError("'modulator' is not a config value: the driver gives the estimator "
                             "the run's HARPO modulator, configured under algorithm.harpo")
        if not {"estimator", "eps", "std_ddof", "harpo", "ema_decay"} <= info.data.keys():
            return params  # a field it depends on is invalid and reported on its own
        name = info.data["estimator"]
        kwargs = _estimator_params(name, info.data, params)
        try:
            make_estimator(name, **kwargs)
        except ValueError:
            raise
        except Exception as exc:  # a user estimator may fail in any way
            raise ValueError(f"estimator {name!r} cannot be built with {kwargs}: "
                             f"{type(exc).__name__}: {exc}") from exc
        return params

    def estimator_params(self, modulator: Any = None) -> dict[str, Any]:
        """Keyword arguments for ``make_estimator(self.estimator, ...)``.

        An estimator that takes a ``modulator`` (harpo) builds an in-process one from its
        HarpoConfig fields; given ``modulator`` (e.g. a remote one built from
        :meth:`modulator_config`), those fields are left out and it is passed instead.
        """
        kwargs = _estimator_params(self.estimator, dict(self), self.params)
        if modulator is None:
            return kwargs
        if "modulator" not in estimator_parameters(self.estimator):
            raise ValueError(f"estimator {self.estimator!r} takes no modulator")
        kept = {k: v for k, v in kwargs.items() if k not in _HARPO_FIELDS}
        return kept | {"modulator": modulator}

    def modulator_config(self) -> HarpoConfig:
        """The HARPO config the estimator's modulator uses: ``harpo`` with ``params``'
        HarpoConfig fields (``history``, say) on top."""
        overrides = {k: v for k, v in self.params.items() if k in _HARPO_FIELDS}
        return HarpoConfig(**(self.harpo.model_dump() | overrides))


def _estimator_params(estimator: str, fields: dict[str, Any], params: dict[str, Any]
                      ) -> dict[str, Any]:
    """The section's values for the parameters ``estimator`` takes, then ``params`` on top."""
    candidates = {"eps": fields["eps"], "std_ddof": fields["std_ddof"],
                  "decay": fields["ema_decay"], **fields["harpo"].model_dump()}
    accepted = estimator_parameters(estimator)
    return {k: v for k, v in candidates.items() if k in accepted} | params
