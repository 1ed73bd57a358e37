"""``harpo compare``'s plan: which runs a study holds, each one's full configuration.

A study trains the same configuration once per estimator variant and seed. Everything but the
estimator (data, warm start = ``model.path``, steps, batch, learner, rollout settings) is the
same for every run of a seed; seeds are ``run.seed + k``. Every run's configuration is built
and validated here, before anything is written or started, so a bad estimator name, parameter
or ``--set`` override is refused with the config's own message.

Variants are written ``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]``: ``harpo:zero_signal=floor``,
``harpo_on:base=dr_grpo``, ``mt_grpo:lam=0.5:lr=0.2``. ``KEY=VALUE`` goes to
``algorithm.params`` (so the estimator's own parameter check applies); VALUE is YAML. A user
estimator ``pkg.mod:fn`` is a name too (its parts have no ``=``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

PLAN_FILE = "study.json"
RUNS_DIR, PLANS_DIR, RESULTS_DIR = "runs", "plans", "results"


@dataclass(frozen=True)
class Variant:
    label: str  # as the user wrote it: the report's name for it
    estimator: str
    params: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """A directory-safe form of the label."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label.replace("=", "-")).strip("-")


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    variant: str  # its label
    seed_index: int
    seed: int


def parse_variants(text: str) -> list[Variant]:
    """``grpo,harpo:zero_signal=floor`` -> variants; an empty or repeated entry is an error."""
    labels = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not label for label in labels):
        raise ValueError(f"--estimators {text!r}: give a comma-separated list of estimators, "
                         f"e.g. grpo,harpo (an entry is empty)")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"--estimators lists {repeated} more than once")
    variants = []
    for label in labels:
        parts = label.split(":")
        name_parts = [p for p in parts if "=" not in p]
        settings = [p for p in parts if "=" in p]
        if parts[:len(name_parts)] != name_parts:
            raise ValueError(f"--estimators entry {label!r}: write the estimator first, then "
                             f":KEY=VALUE settings (e.g. harpo:zero_signal=floor)")
        params = {}
        for setting in settings:
            key, _, value = setting.partition("=")
            if not key.isidentifier():
                raise ValueError(f"--estimators entry {label!r}: {key!r} is not a parameter "
                                 f"name (settings are :KEY=VALUE)")
            try:
                params[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"--estimators entry {label!r}: the value of {key} "
                                 f"({value!r}) is not valid YAML") from None
        variants.append(Variant(label, ":".join(name_parts), params))
    slugs = [v.slug for v in variants]
    clash = sorted({s for s in slugs if slugs.count(s) > 1})
    if clash:
        raise ValueError(f"--estimators: entries {clash} name the same run directory; "
                         f"write them differently")
    return variants


def run_config(config_path: Path, overrides: dict, variant: Variant, seed: int,
               run_dir: Path):
    """The full configuration of one run (validated: a bad estimator or parameter raises the
    config's error, prefixed with the variant)."""
    from services.config import load_config

    merged = dict(overrides)
    merged["algorithm.estimator"] = variant.estimator
    for key, value in variant.params.items():
        merged[f"algorithm.params.{key}"] = value
    merged["run.seed"] = seed
    merged["run.output_dir"] = str(run_dir)
    merged["run.name"] = f"{config_path.stem}-{variant.slug}-seed{seed}"
    try:
        return load_config(config_path, merged).with_absolute_paths()
    except ValueError as exc:
        raise ValueError(f"--estimators entry {variant.label!r}: {exc}") from None


@dataclass
class Study:
    root: Path
    config_path: Path
    overrides: dict
    variants: list[Variant]
    seeds: int
    runs: list[PlannedRun]
    configs: dict  # run_id -> TrainConfig

    def run_dir(self, run_id: str) -> Path:
        return self.root / RUNS_DIR / run_id

    def plan_path(self, run_id: str) -> Path:
        return self.root / PLANS_DIR / f"{run_id}.yaml"

    def result_path(self, run_id: str) -> Path:
        return self.root / RESULTS_DIR / f"{run_id}.json"

    def before_path(self, run_id: str) -> Path:
        return self.root / RESULTS_DIR / f"{run_id}.before.json"

    def manifest(self) -> dict:
        return {"config": str(self.config_path), "overrides": self.overrides,
                "seeds": self.seeds, "variants": [asdict(v) for v in self.variants],
                "runs": [asdict(r) for r in self.runs]}


def plan_study(config_path: str | Path, estimators: str, seeds: int, overrides: dict,
               out: str | Path) -> Study:
    """Every run's configuration, checked; nothing is written."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise ValueError(f"config file {str(config_path)!r} does not exist")
    variants = parse_variants(estimators)
    root = Path(out).resolve()
    if "algorithm.estimator" in overrides:
        raise ValueError("--set algorithm.estimator: the study sets the estimator of each run "
                         "from --estimators")
    from services.config import load_config

    base_seed = load_config(config_path, overrides).run.seed  # --set errors surface here
    runs, configs = [], {}
    for variant in variants:
        for k in range(seeds):
            run_id = f"{variant.slug}-seed{k}"
            config = run_config(config_path, overrides, variant, base_seed + k,
                                root / RUNS_DIR / run_id)
            runs.append(PlannedRun(run_id, variant.label, k, base_seed + k))
            configs[run_id] = config
    return Study(root, config_path.resolve(), dict(overrides), variants, seeds, runs, configs)


def check_against_disk(study: Study) -> None:
    """A study directory may be resumed or extended, never repurposed: a run planned there
    before with a different configuration is refused (its results would mix two setups)."""
    for run in study.runs:
        path = study.plan_path(run.run_id)
        if path.is_file() and path.read_text() != study.configs[run.run_id].to_yaml():
            raise ValueError(
                f"{study.root} already holds run {run.run_id} planned with a different "
                f"configuration ({path}); nothing was changed. Give the study another --out "
                f"directory, or the same CONFIG and --set as before to resume it")


def write_plan(study: Study) -> None:
    for sub in (PLANS_DIR, RESULTS_DIR, RUNS_DIR):
        (study.root / sub).mkdir(parents=True, exist_ok=True)
    for run in study.runs:
        path = study.plan_path(run.run_id)
        if not path.is_file():
            path.write_text(study.configs[run.run_id].to_yaml())
    manifest = study.root / PLAN_FILE
    previous = json.loads(manifest.read_text()) if manifest.is_file() else {"runs": []}
    known = {r["run_id"] for r in previous.get("runs", [])}
    merged = study.manifest()
    merged["runs"] = previous.get("runs", []) + [r for r in merged["runs"]
                                                 if r["run_id"] not in known]
    seen = {v["label"] for v in previous.get("variants", [])}
    merged["variants"] = previous.get("variants", []) + [v for v in merged["variants"]
                                                         if v["label"] not in seen]
    manifest.write_text(json.dumps(merged, indent=1) + "\n")
