"""What a report shows, read from a run directory's stage outputs.

Every figure here is read from a file some stage wrote (``stages/*.json``,
``ssl/<arm>/seed-<s>/metrics.json`` and ``learning_curve.parquet``, ``quality/quality.json``,
``shards/.manifest.json``, ``adapters/*/tune.json``, ``config.json``); the only arithmetic is
aggregation over seeds (mean, sample std) and paired differences between arms, whose
statistics (95% CI, paired t-test) are :func:`pipeline.evaluate.paired.paired_difference`'s. A file
that is missing or unreadable leaves its part as None, which the report renders as "not run".
The same outcome as flat rows (per arm, per run) is :mod:`pipeline.report.tables`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import saved_metadata
from pipeline.data.shard_format import ShardError, manifest_path
from pipeline.data.shards import verify_shards
from pipeline.evaluate.paired import (
    DoublingCheck,
    PairedDifference,
    doubling_check,
    paired_difference,
)
from pipeline.integrity import UNIT_MARKER, unit_problem
from pipeline.runs import read_json
from pipeline.stage_graph import STAGE_ORDER

NOT_RUN = "not run"
# control: as many real unlabeled images as synthetic rows, labeled by the synthetic filter's
# encoder/prototype judge and added as labeled rows the way synthetic rows are.
# Round 2 (loop.rounds=2): augmented-r2 trains on the round-2 shards; selftrain, its control,
# on the pseudo-labeled real images the round-2 adapters were tuned on.
# pool-oracle is an evaluation arm (the base's pretraining images as extra unlabeled data).
ARM_ORDER = ("supervised", "supervised+synthetic", "baseline", "augmented", "replay", "control",
             "pool-oracle", "augmented-r2", "selftrain", "baseline-2x", "augmented-2x",
             "supervised-2x", "supervised+synthetic-2x")
# (arm, against): the differences a reader asks about, most important first.
# augmented - control: do generated images add anything beyond the encoder's pseudo-labels?
# Round 2: augmented-r2 - selftrain says whether generation adds to self-training.
COMPARISONS = (("augmented", "baseline"), ("augmented", "replay"), ("augmented", "control"),
               ("replay", "baseline"), ("baseline", "supervised"),
               ("augmented-2x", "baseline-2x"), ("baseline-2x", "baseline"),
               ("control", "baseline"), ("augmented", "supervised"),
               ("supervised+synthetic", "supervised"), ("pool-oracle", "baseline"),
               ("augmented", "pool-oracle"),
               ("augmented-r2", "baseline"), ("augmented-r2", "selftrain"),
               ("augmented-r2", "augmented"), ("selftrain", "baseline"))


def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (ddof=1; None for one value) and n, over finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None, 0
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None), len(v)


@dataclass
class SeedResult:
    seed: int
    metrics: dict
    path: Path
    curve: pd.DataFrame | None = None
    unit_key: str | None = None  # the unit's key (unit.json): what its result depends on

    @property
    def top1_error(self) -> float:
        return float(self.metrics["top1_error"])

    @property
    def val_error(self) -> float | None:
        """Error on the held-out validation split (None for runs without one)."""
        v = self.metrics.get("val_error")
        return None if v is None or not math.isfinite(float(v)) else float(v)

    @property
    def curve_split(self) -> str:
        """Which images the learning curve's ``test_error`` was measured on.

        Runs with a validation split write a ``curve_split`` column ("validation", also in
        metrics.json); older curves have none and were measured on test images.
        """
        if self.curve is not None and "curve_split" in self.curve.columns and len(self.curve):
            return str(self.curve["curve_split"].iloc[-1])
        return str(self.metrics.get("curve_split") or "test")


@dataclass
class ArmResult:
    """One SSL arm over the seeds that finished (metrics.json present)."""

    arm: str
    seeds: list[SeedResult] = field(default_factory=list)

    @property
    def errors(self) -> list[float]:
        return [s.top1_error for s in self.seeds]

    @property
    def summary(self) -> tuple[float | None, float | None, int]:
        return mean_std(self.errors)

    @property
    def val_summary(self) -> tuple[float | None, float | None, int]:
        """Mean/std/n of the validation error over the seeds that have one."""
        return mean_std([s.val_error for s in self.seeds if s.val_error is not None])

    def per_class_accuracy(self) -> dict[str, float | None]:
        """Mean over seeds of each class's test accuracy (metrics.json ``per_class_accuracy``)."""
        names = list(self.seeds[0].metrics.get("per_class_accuracy", {}))
        return {n: mean_std([s.metrics["per_class_accuracy"].get(n) for s in self.seeds])[0]
                for n in names}

    def confusion(self) -> np.ndarray | None:
        """Confusion matrix summed over seeds (counts: true class x predicted class)."""
        mats = [np.asarray(s.metrics["confusion_matrix"]) for s in self.seeds
                if s.metrics.get("confusion_matrix")]
        return np.sum(mats, axis=0) if mats else None


@dataclass
class Comparison:
    """arm minus against, paired by seed (same seed = same init and split).

    ``paired`` holds the statistics (95% CI and p only with ``MIN_REPETITIONS`` pairs or more).
    """

    arm: str
    against: str
    seeds: list[int]
    arm_errors: list[float]
    against_errors: list[float]

    @property
    def differences(self) -> list[float]:
        return [a - b for a, b in zip(self.arm_errors, self.against_errors, strict=True)]

    @property
    def summary(self) -> tuple[float | None, float | None, int]:
        return mean_std(self.differences)

    @property
    def paired(self) -> PairedDifference:
        return paired_difference(self.arm_errors, self.against_errors)


@dataclass
class RunData:
    run_dir: Path
    config: dict | None
    stages: dict[str, dict]
    arms: dict[str, ArmResult]
    quality: dict | None
    manifest: dict | None
    tunes: dict[str, dict]
    problems: list[str] = field(default_factory=list)
    # arm (or "shards") -> "corrupt: FILE (reason)": read but failed its check, not "not run"
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def preset(self) -> str:
        return str((self.config or {}).get("preset") or self.run_dir.name.rsplit("-", 1)[0])

    @property
    def config_hash(self) -> str | None:
        return saved_metadata(self.config or {}).get("config_hash")

    @property
    def versions(self) -> dict:
        return saved_metadata(self.config or {}).get("versions") or {}

    def stage_status(self, stage: str) -> str:
        rec = self.stages.get(stage)
        if rec is None:
            return NOT_RUN
        return "reused" if rec.get("adopted_from") else "done"

    def comparisons(self) -> list[Comparison]:
        out = []
        for arm, against in COMPARISONS:
            a, b = self.arms.get(arm), self.arms.get(against)
            if not a or not b:
                continue
            eb = {s.seed: s.top1_error for s in b.seeds}
            common = [s for s in a.seeds if s.seed in eb]
            if common:
                out.append(Comparison(arm, against, [s.seed for s in common],
                                      [s.top1_error for s in common],
                                      [eb[s.seed] for s in common]))
        return out

    def comparison(self, arm: str, against: str) -> Comparison | None:
        return next((c for c in self.comparisons() if (c.arm, c.against) == (arm, against)),
                    None)

    def headline_pair(self) -> tuple[str, str]:
        """The comparison the verdict leads with: augmented vs baseline where the SSL arms
        ran, else supervised+synthetic vs supervised (a run without an unlabeled pool)."""
        if "baseline" not in self.arms and \
                {"supervised", "supervised+synthetic"} <= set(self.arms):
            return "supervised+synthetic", "supervised"
        return "augmented", "baseline"

    def doubling(self, arm: str = "augmented", against: str = "baseline"
                 ) -> DoublingCheck | None:
        """The doubling rule over this run's seeds: ``against`` at K and 2K steps (its
        ``-2x`` arm) and, when ``arm`` and its ``-2x`` arm ran, the gain at both, all on the
        seeds every one of those arms finished (so the figures pair up); None without
        ``against`` and its ``-2x`` arm on a common seed. Errors and differences of error in
        % (arm minus against, as every comparison in the report)."""
        names = [against, f"{against}-2x"]
        if arm in self.arms and f"{arm}-2x" in self.arms:
            names += [arm, f"{arm}-2x"]
        if not all(n in self.arms for n in names[:2]):
            return None
        err = {n: {s.seed: 100 * s.top1_error for s in self.arms[n].seeds} for n in names}
        seeds = sorted(set.intersection(*(set(e) for e in err.values())))
        if not seeds:
            return None

        def col(name: str) -> list[float]:
            return [err[name][s] for s in seeds]

        gains = [paired_difference(col(a), col(b)) if a in err else None
                 for a, b in ((arm, against), (f"{arm}-2x", f"{against}-2x"))]
        return doubling_check(col(against), col(f"{against}-2x"), *gains)

    def sampling_images_per_s(self) -> float | None:
        return ((self.stages.get("sample") or {}).get("metrics") or {}).get("images_per_s")

    def param_counts(self) -> dict | None:
        """Adapter vs base parameter counts, from the first adapter's tune.json."""
        for info in self.tunes.values():
            if info.get("param_counts"):
                return info["param_counts"]
        return None


def _seed_of(path: Path) -> int | None:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def load_arms(run_dir: Path, problems: list[str] | None = None,
              corrupt: dict[str, str] | None = None) -> dict[str, ArmResult]:
    """Every ``ssl/<arm>/seed-<s>/metrics.json`` (arms in the usual order, then the rest).

    A metrics file that fails its schema or the sha256 its unit marker recorded is left out
    and named in ``problems`` and ``corrupt`` (per arm), never read as a result."""
    problems = problems if problems is not None else []
    corrupt = corrupt if corrupt is not None else {}
    ssl = run_dir / "ssl"
    arms: dict[str, ArmResult] = {}
    names = sorted((p.name for p in ssl.iterdir() if p.is_dir()),
                   key=lambda a: (ARM_ORDER.index(a) if a in ARM_ORDER else 99, a)) \
        if ssl.is_dir() else []
    for arm in names:
        seeds = []
        for seed_dir in sorted((ssl / arm).glob("seed-*"), key=lambda p: _seed_of(p) or 0):
            if not (seed_dir / "metrics.json").exists():
                continue  # running or not started: not a result yet
            marker = read_json(seed_dir / UNIT_MARKER) or {}
            bad = unit_problem(seed_dir, marker, only=("metrics.json", "learning_curve.parquet"))
            if bad is not None:
                note = f"corrupt: {bad[0]} ({bad[1]})"
                problems.append(note)
                corrupt.setdefault(arm, note)
                continue
            metrics = read_json(seed_dir / "metrics.json")
            seed = metrics.get("seed", _seed_of(seed_dir))
            # What the stage learned beside the classifier (control: the judge's precision).
            unit = marker.get("metrics") or {}
            metrics = {**{k: v for k, v in unit.items() if k.startswith(("control_",
                                                                          "selftrain_"))},
                       **metrics}
            curve = None
            if (seed_dir / "learning_curve.parquet").exists():
                try:
                    curve = pd.read_parquet(seed_dir / "learning_curve.parquet")
                except (OSError, ValueError) as e:
                    problems.append(f"{seed_dir / 'learning_curve.parquet'} unreadable: {e}")
            seeds.append(SeedResult(int(seed), metrics, seed_dir, curve, marker.get("key")))
        if seeds:
            arms[arm] = ArmResult(arm, seeds)
    return arms


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass a directory "
                                "under runs/ (see `augment runs`)")
    problems: list[str] = []
    config = read_json(run_dir / "config.json")
    if config is None:
        problems.append("config.json missing or unreadable")
    stages = {}
    for stage in STAGE_ORDER:
        rec = read_json(run_dir / "stages" / f"{stage}.json")
        if rec is not None:
            stages[stage] = rec
    tunes = {}
    adapters = run_dir / "adapters"
    if adapters.is_dir():
        for d in sorted(adapters.iterdir()):
            info = read_json(d / "tune.json")
            if info is not None:
                tunes[d.name] = info
    corrupt: dict[str, str] = {}
    arms = load_arms(run_dir, problems, corrupt)
    manifest = None
    if manifest_path(run_dir / "shards").exists():
        try:  # the report's shard figures come from the manifest: only a verified one
            manifest = verify_shards(run_dir / "shards")
        except ShardError as e:
            corrupt["shards"] = f"corrupt: {manifest_path(run_dir / 'shards')} ({e})"
            problems.append(corrupt["shards"])
    return RunData(run_dir, config, stages, arms, read_json(run_dir / "quality" / "quality.json"),
                   manifest, tunes, problems, corrupt)


# --------------------------------------------------------------------------- arms


def budget_short(run: RunData) -> bool | None:
    """True when the SSL baseline's mean error is not below supervised training's (the budget
    is too short to compare SSL arms); None when either arm has not run."""
    sup, base = run.arms.get("supervised"), run.arms.get("baseline")
    if sup is None or base is None:
        return None
    return bool(base.summary[0] >= sup.summary[0])


def report_arms(run: RunData) -> list[str]:
    """The arms a report lists: configured or finished, in ``ARM_ORDER``, then any others."""
    configured = ((run.config or {}).get("ssl") or {}).get("arms")
    wanted = set(configured) if configured else set(ARM_ORDER) - {"control"}
    return [a for a in ARM_ORDER if a in wanted or a in run.arms] + \
        [a for a in run.arms if a not in ARM_ORDER]
