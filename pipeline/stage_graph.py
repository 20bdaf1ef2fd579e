"""The stages of a run, declared once.

Each stage names the config parts it reads and the stages upstream of it (its key hashes
both, ``pipeline.config.stage_key``), and what it writes: the keys of its record's
``outputs`` and the paths they point to, relative to the run directory (or to ``round-2/``
for a stage that also runs in the second round). The order, the key graph, the records,
reuse of a sibling run's outputs and the report's stage table are all read from here;
``pipeline.stages.STAGE_FUNCTIONS`` binds each name to the function that runs it. The
transfer run declares its steps with the same ``Stage`` (``pipeline.transfer.steps``), and
every stage's and step's key comes from :func:`stage_key_of`.

This module imports only ``pipeline.digest``, so every layer can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.digest import digest


@dataclass(frozen=True)
class Stage:
    name: str
    parts: tuple[str, ...]          # config sections it reads
    upstream: tuple[str, ...]       # stages whose keys its key folds in
    outputs: dict[str, str]         # record output name -> path (dir/ or file) it writes
    second_round: bool = False      # runs again in round-2/ when loop.rounds is 2
    doc: str = ""


STAGES: tuple[Stage, ...] = (
    Stage("split", ("dataset", "labels_per_class", "split_seed", "validation_per_class",
                    "task_images", "half_seed", "image_mode", "resize", "image_column",
                    "label_column"), (),
          {"split": "split.parquet"},
          doc="labeled / unlabeled / validation indices, stratified, seeded"),
    Stage("pretrain", ("dataset", "image_size", "pretrain"), ("split",), {"base": "base/"},
          doc="an unconditional base U-Net trained on the unlabeled pool (only if configured)"),
    Stage("fit", ("base_model", "encoder", "image_size", "fit"), ("split", "pretrain"),
          {"fit": "fit/"},
          doc="does the base fit the data: its samples against the pool, KID and coverage"),
    Stage("encode", ("encoder", "image_size"), ("split",),
          {"tokens": "conditions/tokens.safetensors"}, second_round=True,
          doc="condition tokens of the labeled images (and neighbours) from the image encoder"),
    Stage("tune", ("base_model", "encoder", "image_size", "adapter", "tuning"),
          ("encode", "pretrain"), {"adapters": "adapters/"}, second_round=True,
          doc="one ANL adapter per class (or one shared), base frozen"),
    Stage("sample", ("sampling",), ("tune",), {"samples": "samples/"}, second_round=True,
          doc="masked sampling, per class, in resumable chunks"),
    Stage("shards", ("shards",), ("sample",), {"shards": "shards/"}, second_round=True,
          doc="the synthetic filter, then Parquet shards with a manifest written last"),
    Stage("quality", ("quality", "encoder", "image_size"), ("shards", "split"),
          {"quality": "quality/"}, doc="KID, diversity, near-copies and class grids"),
    Stage("ssl", ("ssl",), ("split", "shards"), {"ssl": "ssl/", "classifier": "classifier/"},
          doc="the classifier arms x seeds (supervised, supervised+synthetic, baseline, "
              "augmented, replay, control, pool-oracle, baseline-2x, augmented-2x), then "
              "the chosen arm's classifier exported to classifier/"),
    Stage("loop", ("loop",), ("ssl", "tune"),
          {"pseudo": "round-2/pseudo.parquet", "round": "round-2/", "ssl": "ssl/",
           "grids": "round-2/grids/"},
          doc="second round: pseudo-labels, round-2 generation, augmented-r2 and selftrain"),
    Stage("report", (), ("fit", "quality", "ssl", "loop"),
          {"html": "report.html", "md": "report.md"}, doc="the run's HTML and Markdown report"),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_ORDER: tuple[str, ...] = tuple(BY_NAME)
STAGE_PARTS: dict[str, tuple[str, ...]] = {s.name: s.parts for s in STAGES}
STAGE_UPSTREAM: dict[str, tuple[str, ...]] = {s.name: s.upstream for s in STAGES}
SECOND_ROUND_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.second_round)

# Every upstream stage comes earlier: the order is a topological order of the graph.
assert all(STAGE_ORDER.index(u) < STAGE_ORDER.index(s.name) for s in STAGES for u in s.upstream)


def stage_key_of(stage: str, parts: dict[str, Any], upstream: dict[str, str | None],
                 extra: dict[str, Any] | None = None) -> str:
    """A stage's key: the config parts it reads, its upstream stages' keys (None: that stage
    does not run, and is left out) and any further input (``extra``), hashed."""
    up = {k: v for k, v in upstream.items() if v is not None}
    return digest({"stage": stage, "parts": parts, "upstream": up, "extra": extra or {}})[:16]
