"""One typed configuration for a whole augmentation run, loaded from a preset file.

A preset (``data/presets/NAME.yaml``) holds every parameter of a run; ``--set a.b=value``
overrides single fields. Validation is strict (unknown keys are errors) and every error
names the parameter it is about, e.g. ``sampling.mask_ratios[1]=1.5: must be <= 1``.

Two hashes identify work:

* :func:`config_hash` covers every field that affects results (not where runs go, how
  tasks are scheduled, or whether progress bars show); it names the run directory.
* :func:`stage_key` covers only the parts one stage reads plus its upstream stages'
  keys, so changing a sampling parameter leaves the split, encode and tune keys as they
  were and their finished outputs can be reused.

About 400 lines, kept whole: the run's sections, the preset loader, ``--set`` parsing and the
hashes are one schema's parts; each component's own fields live with the component
(``SSLConfig``, ``PretrainConfig``, ``QualityConfig``, ``TuneConfig``, ``AdapterShape``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from anl_core.config import AdapterShape, TuneConfig
from pipeline.digest import digest
from pipeline.evaluate.quality_config import QualityConfig
from pipeline.generate.pretrain_config import PretrainConfig
from pipeline.paths import PRESETS_DIR, resolve_path
from pipeline.ssl.arm_names import SUPERVISED_ARMS, base_arm
from pipeline.ssl.config import BUDGETS, RECIPES, SSLConfig
from pipeline.stage_graph import STAGE_PARTS, stage_key_of
from pipeline.validation import explain

Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


class ConfigError(ValueError):
    """A configuration is invalid; the message names each offending parameter."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key must fail, naming the key, rather than be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _ComponentSection:
    """A section that extends a component's own settings model (``COMPONENT``, declared
    beside the code that runs it). ``component(**run)`` is that model, with the fields the
    run fills in (its size, device, one unit's seed) given as keywords."""

    COMPONENT: ClassVar[type[BaseModel]]

    def component(self, **run: Any) -> Any:
        fields = {k: getattr(self, k) for k in self.COMPONENT.model_fields if k not in run}
        return self.COMPONENT(**fields, **run)


class PretrainSection(_ComponentSection, PretrainConfig):
    """Pretrain an unconditional base U-Net on the unlabeled pool: the fields of
    ``pipeline.generate.pretrain_config.PretrainConfig`` (declared there once), except
    ``sample_size`` (the run's ``image_size``) and ``device`` (the run's device)."""

    sample_size: int = Field(32, exclude=True)  # from image_size
    device: str = Field("auto", exclude=True)   # the run's device

    @model_validator(mode="before")
    @classmethod
    def _filled_by_the_run(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, use in (("sample_size", "image_size"), ("device", "the top-level device")):
                if name in data:
                    raise ValueError(f"pretrain.{name} comes from the run: set {use}")
        return data

    COMPONENT: ClassVar[type[BaseModel]] = PretrainConfig  # with sample_size=, device=


class AdapterSection(_ComponentSection, AdapterShape):
    """Where ANL blocks go and how big they are (``anl_core.config.AdapterShape``, declared
    there), and ``scope``: one adapter per labeled class subset (the method's default) or one
    shared by all classes."""

    scope: Literal["per-class", "shared"] = "per-class"
    COMPONENT: ClassVar[type[BaseModel]] = AdapterShape


class NeighborsSection(_Section):
    """Unlabeled neighbours as extra tuning targets (``pipeline.generate.neighbors``); 0 = off.

    ``per_image``: neighbours per labeled image; ``pool``: unlabeled images searched (each is
    encoded once, in the encode stage); ``self_share``: share of tuning draws that stay on the
    labeled images themselves.
    """

    per_image: int = Field(0, ge=0)
    pool: int = Field(5000, ge=1)
    self_share: Ratio = 0.5
    seed: int = 0


class FilterSection(_Section):
    """Which synthetic rows reach the shards (``pipeline.generate.synthetic_filter``).

    ``method``: "none" keeps every sample; "prototype" keeps a sample only when its mean
    encoder similarity to its label's labeled images beats every other class's by more than
    ``margin``. ``copy_quantile`` > 0 also drops near-copies of the labeled images.
    """

    method: Literal["none", "prototype"] = "none"
    margin: float = Field(0.0, ge=-1, le=2)
    # Near-copies: drop a sample closer (pixel RMSE) to a labeled image than all but this
    # share of ``copy_pool`` real unlabeled images are; 0 = keep them.
    copy_quantile: float = Field(0.0, ge=0, lt=1)
    copy_pool: int = Field(2000, ge=1)
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.method != "none" or self.copy_quantile > 0


class SamplingSection(_Section):
    """Masked, guided sampling: ``per_condition`` images per labeled image and mask ratio."""

    per_condition: int = Field(8, ge=1)
    mask_ratios: list[Ratio] = Field(default_factory=lambda: [0.3], min_length=1)
    guidance: float = Field(2.0, ge=0)
    num_inference_steps: int = Field(50, ge=1)
    scheduler: Literal["ddim"] = "ddim"
    eta: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1)
    # Conditions per chunk file: a killed sampling stage loses at most one chunk.
    chunk_conditions: int = Field(4, ge=1)
    seed: int = 0
    compile: bool = False


class ShardsSection(_Section):
    rows_per_shard: int = Field(4096, ge=1)


class SSLSection(_ComponentSection, SSLConfig):
    """Downstream classifiers: which arms and seeds, plus the trainer's own fields, declared
    once in ``pipeline.ssl.SSLConfig`` (this section extends that model).

    ``budget`` names a step budget (``pipeline.ssl.config.BUDGETS``, e.g. "steps-1048576",
    USB's 2^20); it fills ``steps``, ``eval_every`` and ``checkpoint_every`` unless those are
    given explicitly. ``recipe`` names a training setting (``pipeline.ssl.config.RECIPES``,
    e.g. "cpu-short": warm-up, cosine to 0, the mean of the last evaluations, a narrow
    cnn-small); its fields are filled the same way. ``seed`` and ``device`` are not set here: each unit gets one seed of
    ``seeds`` and the run's device (``component(seed=, device=)``).
    """

    # "-2x": the same arm at twice the steps (the doubling rule, pipeline.evaluate.paired).
    # "pool-oracle" is an evaluation arm (it reads the base's pretraining half, which a
    # user's task does not have): for sweeps and benches, never for a user preset.
    arms: list[Literal["supervised", "supervised+synthetic", "baseline", "augmented", "replay",
                       "control", "pool-oracle", "baseline-2x", "augmented-2x",
                       "supervised-2x", "supervised+synthetic-2x"]] = Field(
        default_factory=lambda: ["supervised", "baseline", "augmented", "control"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    budget: str | None = None
    recipe: str | None = None
    # The control arm draws its judged real rows from this many unlabeled images.
    control_pool: int = Field(4000, ge=1)
    seed: int = Field(0, exclude=True)       # per unit, from seeds
    device: str = Field("auto", exclude=True)  # the run's device

    @model_validator(mode="before")
    @classmethod
    def _fill_budget(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, use in (("seed", "ssl.seeds"), ("device", "the top-level device")):
                if name in data:
                    raise ValueError(f"ssl.{name} is set per classifier unit; use {use}")
            # A named budget, then a recipe, fills the fields not given explicitly.
            for name, table, hint in (("budget", BUDGETS, " and set ssl.steps"),
                                      ("recipe", RECIPES, "")):
                chosen = data.get(name)
                if chosen is None:
                    continue
                if chosen not in table:
                    raise ValueError(f"ssl.{name}={chosen!r} is not a known {name}; choose one "
                                     f"of {', '.join(table)} or leave it null{hint}")
                data = {**table[chosen], **data}
        return data

    @model_validator(mode="after")
    def _pool_for_ssl_arms(self) -> SSLSection:
        needs_pool = [a for a in self.arms
                      if base_arm(a) not in (*SUPERVISED_ARMS, "pool-oracle")]
        if self.unlabeled_pool == 0 and needs_pool:
            raise ValueError(f"ssl.unlabeled_pool=0 leaves no unlabeled images for "
                             f"{', '.join(needs_pool)}; keep supervised and "
                             "supervised+synthetic only, or allow a pool")
        if self.synthetic_as == "unlabeled" and any(
                base_arm(a) == "supervised+synthetic" for a in self.arms):
            raise ValueError("supervised+synthetic reads the synthetic rows as labeled rows, "
                             "but ssl.synthetic_as=unlabeled puts them in the unlabeled pool, "
                             "which a supervised arm never reads; set synthetic_as=labeled")
        return self

    COMPONENT: ClassVar[type[BaseModel]] = SSLConfig  # one unit's: with seed=, device=


class QualitySection(_ComponentSection, QualityConfig):
    """Synthetic-data quality: ``pipeline.evaluate.quality_config.QualityConfig`` (declared
    there), plus an off switch."""

    enabled: bool = True
    COMPONENT: ClassVar[type[BaseModel]] = QualityConfig


class LoopSection(_Section):
    """A second round (DPT's loop, ``pipeline.generate.pseudo_labels``): the baseline classifier pseudo-labels
    the unlabeled pool, each class's adapter is tuned again on its labeled images plus its
    confident pseudo-labeled ones, sampling is conditioned on them, and ``augmented-r2``
    trains on the round-2 shards beside ``selftrain`` (the same pseudo-labeled real images
    as its extra rows, the control that must be beaten).

    ``rounds``: 1 = off. ``per_class``: at most K pseudo-labeled images per class, the most
    confident first (class-balanced). ``threshold``: the least EMA-softmax confidence kept.
    ``warm_start``: round 2 starts each adapter from its round-1 weights (else fresh).
    ``conditions``: sample from labeled and pseudo-labeled images, or labeled ones only.
    ``per_condition``: round-2 samples per condition image (default: sampling.per_condition).
    """

    rounds: Literal[1, 2] = 1
    per_class: int = Field(50, ge=1)
    threshold: Ratio = 0.95
    warm_start: bool = True
    conditions: Literal["labeled+pseudo", "labeled"] = "labeled+pseudo"
    per_condition: int | None = Field(None, ge=1)


CONFIG_FILE = "config.json"
# A saved config's metadata key, which loading ignores (as diffusers' ``_class_name``); runs
# written before it kept the same entries at the top level.
META_KEY = "_meta"
LEGACY_META_KEYS = ("config_hash", "versions")

# Fields that say where and how work runs, not what it computes: left out of every hash.
RUNTIME_FIELDS = frozenset({"preset", "runs_dir", "task_runner", "dask_address", "dask_n_workers",
                            "progress", "device", "require_gpu", "arms_at_once"})


class AugmentConfig(_Section):
    preset: str = "custom"
    dataset: Literal["fashion-mnist", "cifar10", "image-folder"] = "fashion-mnist"
    dataset_root: str | None = None
    download: bool = False
    labels_per_class: int = Field(4, ge=1)
    # Held-out validation images per class (labels read only to choose settings; never
    # trained on, removed from the unlabeled pool); 0: none, the curve points use test images.
    validation_per_class: int = Field(0, ge=0)
    split_seed: int = 0
    # "task-half": labels, pool and validation come from the task half of the training set,
    # cut once by half_seed (pipeline.data.splits.halves); the other half is the base
    # model's (`augment pretrain --half base`), so the base never saw a task image.
    task_images: Literal["all", "task-half"] = "all"
    half_seed: int = 0
    image_size: int = Field(32, ge=8)
    base_model: str = "data/models/fashion-mnist-ddpm-32"
    pretrain: PretrainSection | None = None
    encoder: str = "efficientnet-lite0"
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    tuning: TuneConfig = Field(default_factory=TuneConfig)  # anl_core.config, declared there
    neighbors: NeighborsSection = Field(default_factory=NeighborsSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    filter: FilterSection = Field(default_factory=FilterSection)
    shards: ShardsSection = Field(default_factory=ShardsSection)
    ssl: SSLSection = Field(default_factory=SSLSection)
    quality: QualitySection = Field(default_factory=QualitySection)
    loop: LoopSection = Field(default_factory=LoopSection)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    require_gpu: bool = False
    task_runner: Literal["default", "dask"] = "default"
    dask_address: str | None = None
    dask_n_workers: int = Field(2, ge=1)
    # Classifier units (arm x seed) trained side by side, one process each: a number, or
    # "auto" = as many as fit the card by one unit's measured peak memory (one on the CPU).
    arms_at_once: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    runs_dir: str = "runs"
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> AugmentConfig:
        if self.dataset == "image-folder" and not self.dataset_root:
            raise ValueError("dataset_root is required when dataset='image-folder'")
        if self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size={self.image_size} must be a power of two (U-Net strides)")
        if "pool-oracle" in self.ssl.arms and self.task_images != "task-half":
            raise ValueError("the pool-oracle arm adds the base model's pretraining half to "
                             "the pool; it needs task_images=task-half (and a base pretrained "
                             "on the base half)")
        if self.loop.rounds == 2 and "baseline" not in self.ssl.arms:
            raise ValueError("loop.rounds=2 pseudo-labels with the baseline arm's classifier: "
                             "add 'baseline' to ssl.arms or set loop.rounds=1")
        net = self.ssl.net if self.ssl.net != "auto" else \
            ("wrn-28-2" if self.dataset == "cifar10" else None)  # image folders: found later
        if self.ssl.net_width is not None and net is not None and net.startswith("wrn"):
            raise ValueError(f"ssl.net_width applies to the cnn nets, not {net}; leave it null "
                             "or set ssl.net=cnn-small")
        return self

    # -- helpers that read like the config file -------------------------------------------

    @property
    def pretrains_base(self) -> bool:
        return self.pretrain is not None

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def save_pretrained(self, directory: str | Path) -> Path:
        """``directory/config.json``: every field, and under ``_meta`` the config hash and
        the versions that run it. ``from_pretrained`` (or ``augment run``) reads it back."""
        from pipeline.atomic import atomic_write_json
        from pipeline.provenance import versions

        record = {**self.model_dump(mode="json"),
                  META_KEY: {"config_hash": config_hash(self), "versions": versions()}}
        return atomic_write_json(Path(directory) / CONFIG_FILE, record)

    @classmethod
    def from_pretrained(cls, path: str | Path,
                        overrides: list[str] | dict[str, Any] | None = None) -> AugmentConfig:
        """A saved config (its ``config.json`` or the folder holding it), or any preset."""
        return load_config(path, overrides)

    def runs_root(self) -> Path:
        return resolve_path(self.runs_dir)


# --------------------------------------------------------------------------- errors


def validate_config(data: dict[str, Any]) -> AugmentConfig:
    try:
        return AugmentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(e)) from None


# --------------------------------------------------------------------------- presets


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def saved_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """What a saved config.json records beside its fields (``config_hash``, ``versions``):
    its ``_meta`` key, or the same keys at the top level in runs written before it."""
    return record.get(META_KEY) or {k: record[k] for k in LEGACY_META_KEYS if k in record}


def preset_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_dir() and (p / CONFIG_FILE).is_file():  # a run directory
        return p / CONFIG_FILE
    if p.suffix in (".yaml", ".yml", ".json") and p.exists():
        return p
    cand = PRESETS_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    raise ConfigError(f"unknown preset {str(name_or_path)!r}: give a YAML file path, a run's "
                      f"config.json (or its run directory) or one of "
                      f"{', '.join(available_presets())} (files in {PRESETS_DIR})")


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[0.1, 0.2]"]`` -> ``{"a.b": 1, "c": [0.1, 0.2]}`` (values are YAML)."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value (e.g. sampling.guidance=3)")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {dotted!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(preset: str | Path, overrides: list[str] | dict[str, Any] | None = None
                ) -> AugmentConfig:
    """Read a preset (name or YAML path), apply ``key=value`` overrides, validate."""
    path = preset_path(preset)
    with open(path) as f:
        data = (json.load(f) if path.suffix == ".json" else yaml.safe_load(f)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a YAML mapping of parameters")
    for key in (META_KEY, *LEGACY_META_KEYS):  # a saved config's metadata: not a field
        data.pop(key, None)
    data.setdefault("preset", path.stem)
    return validate_config(apply_overrides(data, parse_overrides(overrides)))


def with_overrides(config: AugmentConfig, overrides: list[str] | dict[str, Any] | None
                   ) -> AugmentConfig:
    if not overrides:
        return config
    parsed = parse_overrides(overrides)
    data = config.model_dump(mode="json")
    # A budget or recipe named here fills its fields afresh: the dump holds every field's
    # current value as if it were given explicitly, which would otherwise beat the name.
    ssl = {k.split(".", 1)[1]: v for k, v in parsed.items() if k.startswith("ssl.")}
    if isinstance(parsed.get("ssl"), dict):
        ssl.update(parsed["ssl"])
    for name, table in (("budget", BUDGETS), ("recipe", RECIPES)):
        for field in table.get(ssl.get(name), {}):
            if field not in ssl:
                data["ssl"].pop(field, None)
    return validate_config(apply_overrides(data, parsed))


# --------------------------------------------------------------------------- hashes


def result_fields(config: AugmentConfig) -> dict[str, Any]:
    fields = config.model_dump(mode="json", exclude=set(RUNTIME_FIELDS))
    if not config.neighbors.per_image:
        fields.pop("neighbors")  # off: runs from before the option keep their hashes
    if not config.filter.enabled:
        fields.pop("filter")  # the same, for the synthetic-row filter
    if not config.validation_per_class:
        fields.pop("validation_per_class")  # and for the validation split
    if config.task_images == "all":
        fields.pop("task_images"), fields.pop("half_seed")  # and for the task half
    if config.ssl.unlabeled_pool is None:
        fields["ssl"].pop("unlabeled_pool")  # and for the pool cap
    if config.loop.rounds == 1:
        fields.pop("loop")  # and for the second round
    return fields


def config_hash(config: AugmentConfig) -> str:
    """Hash of every result-affecting field; the run directory is named by its first 8 chars."""
    return digest(result_fields(config))


# The stage graph (config parts each stage reads, upstream stages) is declared once, in
# pipeline.stage_graph; upstream keys are folded in by the caller, so a change propagates
# downstream only.


def stage_parts(config: AugmentConfig, stage: str) -> dict[str, Any]:
    fields = result_fields(config)
    parts = {name: fields[name] for name in STAGE_PARTS[stage] if name in fields}
    if stage == "split" and config.dataset == "image-folder":
        parts["dataset_root"] = config.dataset_root  # the folder is the dataset's identity
    if stage == "encode" and config.neighbors.per_image:  # the encode stage finds them
        parts["neighbors"] = {k: v for k, v in fields["neighbors"].items() if k != "self_share"}
    if stage == "tune" and config.neighbors.per_image:
        parts["neighbors"] = fields["neighbors"]
    if stage == "shards" and config.filter.enabled:  # the shards stage filters
        parts["filter"] = fields["filter"]
    if stage == "tune" and config.pretrains_base:
        parts.pop("base_model")  # the pretrained base is identified by the pretrain key
    return parts


def stage_key(config: AugmentConfig, stage: str, upstream: dict[str, str] | None = None,
              extra: dict[str, Any] | None = None) -> str:
    """Key of one stage: hash of the config parts it reads + its upstream stage keys."""
    if stage not in STAGE_PARTS:
        raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_PARTS)}")
    return stage_key_of(stage, stage_parts(config, stage), upstream or {}, extra)
