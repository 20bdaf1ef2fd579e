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

The sections themselves (``adapter:``, ``sampling:``, ``ssl:``, ...) are
:mod:`pipeline.config_sections`; each component's own fields live with the component
(``SSLConfig``, ``PretrainConfig``, ``QualityConfig``, ``TuneConfig``, ``AdapterShape``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from anl_core.config import Seed, TuneConfig
from pipeline.config_sections import (
    AdapterSection,
    ExportSection,
    FilterSection,
    FitSection,
    LoopSection,
    NeighborsSection,
    PretrainSection,
    QualitySection,
    SamplingSection,
    Section,
    ShardsSection,
    SSLSection,
)
from pipeline.data.datasets import USER_DATA, dataset_contents
from pipeline.digest import digest
from pipeline.paths import PRESETS_DIR, resolve_path
from pipeline.ssl.config import BUDGETS, RECIPES
from pipeline.stage_graph import STAGE_PARTS, stage_key_of
from pipeline.validation import YAMLTextError, explain, load_yaml


class ConfigError(ValueError):
    """A configuration is invalid; the message names each offending parameter."""


CONFIG_FILE = "config.json"
# A saved config's metadata key, which loading ignores (as diffusers' ``_class_name``); runs
# written before it kept the same entries at the top level.
META_KEY = "_meta"
LEGACY_META_KEYS = ("config_hash", "versions")

# Fields that say where and how work runs, not what it computes: left out of every hash.
RUNTIME_FIELDS = frozenset({"preset", "runs_dir", "task_runner", "dask_address", "dask_n_workers",
                            "progress", "device", "require_gpu", "arms_at_once"})


class AugmentConfig(Section):
    preset: str = "custom"
    dataset: Literal["fashion-mnist", "cifar10", "image-folder", "hf-dataset"] = "fashion-mnist"
    dataset_root: str | None = None
    # How every image is read: "auto" keeps grey files grey and reads the rest as RGB (a
    # folder mixing both becomes RGB); "grey"/"rgb" convert every image, e.g. to fit a base.
    image_mode: Literal["auto", "grey", "rgb"] = "auto"
    # Resize every image to image_size x image_size (Pillow bicubic) as it is read: images
    # of several sizes, or larger than the base model works at.
    resize: bool = False
    # hf-dataset: the image and label columns (None: image/img and label/labels).
    image_column: str | None = None
    label_column: str | None = None
    download: bool = False
    labels_per_class: int = Field(4, ge=1)
    # Held-out validation images per class (labels read only to choose settings; never
    # trained on, removed from the unlabeled pool); 0: none, the curve points use test images.
    validation_per_class: int = Field(0, ge=0)
    split_seed: Seed = 0
    # "task-half": labels, pool and validation come from the task half of the training set,
    # cut once by half_seed (pipeline.data.splits.halves); the other half is the base
    # model's (`augment pretrain --half base`), so the base never saw a task image.
    task_images: Literal["all", "task-half"] = "all"
    half_seed: Seed = 0
    image_size: int = Field(32, ge=8)
    base_model: str = "data/models/fashion-mnist-ddpm-32"
    pretrain: PretrainSection | None = None
    fit: FitSection = Field(default_factory=FitSection)
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
    export: ExportSection = Field(default_factory=ExportSection)
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

    @field_validator("preset")
    @classmethod
    def _a_name_not_a_path(cls, name: str) -> str:
        # The run directory is named after it (pipeline.runs.run_name slugs it, so it stays
        # inside runs_dir anyway): a path here is a mistake to name, not to flatten silently.
        if not name.strip() or any(c in name for c in "/\\\0") or name.strip(".") == "":
            raise ValueError("a preset's name names its run directory, not a folder: use a "
                             "name such as 'my-data' and set runs_dir for where runs go")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> AugmentConfig:
        if self.dataset in ("image-folder", "hf-dataset") and not self.dataset_root:
            raise ValueError(f"dataset_root is required when dataset={self.dataset!r} (the "
                             "folder, saved dataset or Parquet files to read)")
        for key in ("image_column", "label_column"):
            if getattr(self, key) is not None and self.dataset != "hf-dataset":
                raise ValueError(f"{key} names a column of a Hugging Face dataset; it needs "
                                 f"dataset=hf-dataset (dataset is {self.dataset!r})")
        if self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size={self.image_size} must be a power of two (U-Net strides)")
        if "pool-oracle" in self.ssl.arms and self.task_images != "task-half":
            raise ValueError("the pool-oracle arm adds the base model's pretraining half to "
                             "the pool; it needs task_images=task-half (and a base pretrained "
                             "on the base half)")
        if self.export.arm != "best" and self.export.arm not in self.ssl.arms:
            raise ValueError(f"export.arm={self.export.arm!r} is not one of ssl.arms "
                             f"({', '.join(self.ssl.arms)}); name one of them or 'best'")
        if self.export.seed is not None and self.export.seed not in self.ssl.seeds:
            raise ValueError(f"export.seed={self.export.seed} is not one of ssl.seeds "
                             f"{self.ssl.seeds}; name one of them or leave it null (the first)")
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

    def loader_options(self) -> dict[str, Any]:
        """The keyword arguments of ``load_dataset`` this config sets (defaults left out):
        every reader of the dataset (pre-flight, the stages) passes the same ones."""
        options: dict[str, Any] = {}
        if self.image_mode != "auto":
            options["image_mode"] = self.image_mode
        if self.resize:
            options["image_size"] = self.image_size
        for key in ("image_column", "label_column"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        return options

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


def validate_config(data: dict[str, Any], where: str = "configuration") -> AugmentConfig:
    try:
        return AugmentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(e, where)) from None


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
        try:
            out[key.strip()] = load_yaml(raw, f"--set {key.strip()}") if raw.strip() else None
        except YAMLTextError as e:
            raise ConfigError(f"{e}; quote it as a string, or write a list as [a, b]") from None
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


def read_preset(path: Path) -> dict[str, Any]:
    """A preset file's mapping; every way it can be unreadable is one line naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"preset {path} cannot be read ({e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text, str(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON at line {e.lineno}: {e.msg}") from None
    except YAMLTextError as e:
        raise ConfigError(str(e)) from None
    if data is None:
        # Not all defaults: those are USB's GPU budget (2^20 classifier steps); an empty file
        # is far more often a mistake than that choice.
        raise ConfigError(f"preset {path} is empty; write its parameters (`augment init DIR` "
                          "writes one for a folder of images) or name a shipped preset "
                          f"({', '.join(available_presets())})")
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a YAML mapping of parameters (key: value "
                          f"lines), not a {type(data).__name__}")
    return data


def load_config(preset: str | Path, overrides: list[str] | dict[str, Any] | None = None
                ) -> AugmentConfig:
    """Read a preset (name or YAML path), apply ``key=value`` overrides, validate."""
    path = preset_path(preset)
    data = read_preset(path)
    for key in (META_KEY, *LEGACY_META_KEYS):  # a saved config's metadata: not a field
        data.pop(key, None)
    data.setdefault("preset", path.stem)
    data = apply_overrides(data, parse_overrides(overrides))
    return validate_config(data, f"configuration ({path}{' with --set' if overrides else ''})")


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
    if config.export == ExportSection():
        fields.pop("export")  # and for the exported classifier's choice
    if config.fit == FitSection():
        fields.pop("fit")  # and for the domain-fit check (it changes no result)
    if config.image_mode == "auto":
        fields.pop("image_mode")  # and for how images are read
    if not config.resize:
        fields.pop("resize")
    for key in ("image_column", "label_column"):
        if fields[key] is None:
            fields.pop(key)
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
    if stage == "split" and config.dataset in USER_DATA:
        # The files are the dataset's identity, not the folder's name: a changed, added or
        # removed file reruns the split and everything downstream (stat only, no decoding).
        parts["dataset_contents"] = dataset_contents(config.dataset, config.dataset_root)
    if stage == "split" and config.resize:
        parts["image_size"] = config.image_size  # the size every image is resized to
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
