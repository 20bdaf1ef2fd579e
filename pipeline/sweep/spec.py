"""A sweep: a grid of run configs, each cell run over independent repetitions.

A spec file (YAML) names a preset, overrides for every cell (``set``), the grid (``grid``:
any ``--set`` key -> its values; the cells are the product), rules that adjust the cells a
condition matches (``rules``: ``when`` key values -> ``set``), the repetitions and the
comparisons to report::

    name: gain-map
    preset: demo
    set: {task_images: task-half, ssl.recipe: cpu-short, ssl.steps: 4096}
    grid:
      labels_per_class: [1, 4]
      ssl.unlabeled_pool: [0, 2000]
    rules:
      - when: {ssl.unlabeled_pool: 0}
        set: {ssl.arms: [supervised, supervised-2x, supervised+synthetic,
                         supervised+synthetic-2x]}
    repetitions: [0, 1, 2, 3, 4]

Repetition r of a cell is a whole run with its own labeled split, validation split, tuning,
sampling, filter and training seeds (all ``rep_offset + r``), so the repetitions are
independent and the arms within one are paired.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.config import AugmentConfig, ConfigError, load_config, parse_overrides
from pipeline.digest import digest
from pipeline.validation import YAMLTextError, explain, load_yaml

# (arm, against): positive = arm has the lower error. The order is the report's.
DEFAULT_PAIRS = (("augmented", "baseline"), ("supervised+synthetic", "supervised"),
                 ("pool-oracle", "baseline"), ("augmented", "pool-oracle"),
                 ("augmented", "replay"), ("augmented", "control"),
                 ("baseline", "supervised"))
# Each repetition draws these on its own (rep_offset + r).
REPETITION_SEEDS = ("split_seed", "tuning.seed", "sampling.seed", "filter.seed",
                    "neighbors.seed")


class SweepError(ValueError):
    """A sweep spec is invalid; the message names the field and the fix."""


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when: dict[str, Any] = Field(min_length=1)
    set: dict[str, Any] = Field(min_length=1)


class SweepSpec(BaseModel):
    """What a sweep runs. ``set`` and ``rules`` take the keys ``augment run --set`` takes."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)
    preset: str = "demo"
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    # Strict ints (no true as 1), never negative: a repetition's seeds are rep_offset + r.
    repetitions: list[Annotated[int, Field(strict=True, ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    rep_offset: int = Field(0, strict=True, ge=0)
    pairs: list[tuple[str, str]] = Field(default_factory=lambda: list(DEFAULT_PAIRS))
    # Repetitions run at once (worker processes when > 1: flows.sweep.task_runner), each with
    # ``threads`` torch threads. On 2 CPU cores: 2 of 1 thread.
    parallel: int = Field(1, ge=1, strict=True)
    threads: int = Field(1, ge=1, strict=True)
    runs_dir: str | None = None  # default: <runs_dir>/sweeps/<name>

    @field_validator("grid")
    @classmethod
    def _values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} has no values")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"grid.{key} repeats a value: {values}")
        return grid

    @field_validator("repetitions")
    @classmethod
    def _distinct(cls, reps: list[int]) -> list[int]:
        if len(set(reps)) != len(reps):
            raise ValueError(f"repetitions repeat a value: {reps}")
        return reps

    def cells(self) -> list[Cell]:
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            point = dict(zip(keys, values, strict=True))
            overrides = {**self.set, **point}
            for rule in self.rules:
                if all(_same(point.get(k, self.set.get(k)), v) for k, v in rule.when.items()):
                    overrides.update(rule.set)
            out.append(Cell(point, overrides, {"preset": self.preset,
                                               "rep_offset": self.rep_offset}))
        return out

    def only(self, values: dict[str, Any]) -> SweepSpec:
        """This spec with the grid cut to ``values`` (grid key -> one of its values): the
        same cells, the same folders, fewer of them; the report covers what has finished."""
        grid = dict(self.grid)
        for key, value in values.items():
            if key not in grid:
                raise SweepError(f"--only {key}: not a grid key; the grid has "
                                 f"{', '.join(grid) or 'no keys'}")
            if not any(_same(value, v) for v in grid[key]):
                raise SweepError(f"--only {key}={value!r}: not one of its values "
                                 f"{grid[key]}")
            grid[key] = [value]
        return self.model_copy(update={"grid": grid})


@dataclass(frozen=True)
class Cell:
    point: dict[str, Any]       # the grid's values for this cell
    overrides: dict[str, Any]   # everything set on the preset for this cell
    base: dict[str, Any]        # the preset and seed offset the overrides apply to

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.point.items()) or "all"

    @property
    def slug(self) -> str:
        """A file name for the cell: readable, plus a hash of its overrides (a changed cell
        gets a new file, so it reruns alone)."""
        text = "_".join(f"{k.split('.')[-1]}-{_show(v)}" for k, v in self.point.items())
        text = re.sub(r"[^A-Za-z0-9_.-]+", "", text) or "cell"
        return f"{text}-{digest([self.base, self.overrides])[:8]}"


def _same(a: Any, b: Any) -> bool:
    return repr(a) == repr(b)


def _show(v: Any) -> str:
    return "all" if v is None else str(v)


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec {path} not found; give the path of a YAML file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), f"sweep spec {path}") or {}
    except (YAMLTextError, UnicodeDecodeError) as e:
        raise SweepError(str(e)) from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep spec {path} must be a YAML mapping (name, preset, grid, ...)")
    data.setdefault("name", re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-"))
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SweepError(explain(e, f"sweep spec {path}", SweepSpec.model_fields)) from None


def repetition_config(spec: SweepSpec, cell: Cell, r: int,
                      extra: dict[str, Any] | None = None) -> AugmentConfig:
    """The run config of repetition ``r`` of ``cell``: the preset, the cell's overrides, its
    own seeds and training seed, and ``extra`` (runs_dir, progress)."""
    s = spec.rep_offset + r
    overrides = {**parse_overrides(cell.overrides), **{k: s for k in REPETITION_SEEDS},
                 "ssl.seeds": [s], **(extra or {})}
    try:
        return load_config(spec.preset, overrides)
    except ConfigError as e:
        raise SweepError(f"cell {cell.label}: {e}") from None


def check_spec(spec: SweepSpec) -> list[AugmentConfig]:
    """Every cell's first repetition validated before any work (one config per cell)."""
    configs = [repetition_config(spec, cell, spec.repetitions[0]) for cell in spec.cells()]
    arms = {a for c in configs for a in c.ssl.arms}
    from pipeline.ssl.arm_names import ARMS

    for a, b in spec.pairs:
        for arm in (a, b):
            if arm not in ARMS:
                raise SweepError(f"pairs: unknown arm {arm!r}; arms are {', '.join(ARMS)}")
    if not any(a in arms and b in arms for a, b in spec.pairs):
        raise SweepError("no cell runs both arms of any pair in `pairs`; add the arms to "
                         "ssl.arms (set or rules) or change pairs")
    return configs
