"""harpo_core: the HARPO algorithm library.

Pure numpy/torch, no Ray: advantage estimators (a registry), the HARPO modulator, PPO losses and
the reward functions of the paper's setup. Usable from any trainer.
"""

from harpo_core.batch import GroupedBatch
from harpo_core.estimators import (
    EstimatorOutput,
    available_estimators,
    compute_advantages,
    estimator_parameters,
    make_estimator,
    register_estimator,
)
from harpo_core.modulator import (
    GroupModulation,
    GroupStats,
    HarpoConfig,
    HarpoModulator,
    ModulationResult,
    Modulator,
)
from harpo_core.segments import Segments

__all__ = [
    "EstimatorOutput",
    "GroupModulation",
    "GroupStats",
    "GroupedBatch",
    "HarpoConfig",
    "HarpoModulator",
    "ModulationResult",
    "Modulator",
    "Segments",
    "available_estimators",
    "compute_advantages",
    "estimator_parameters",
    "make_estimator",
    "register_estimator",
]
