"""The sections of a run's configuration (``adapter:``, ``sampling:``, ``ssl:``, ...), each a
strict pydantic model; :class:`pipeline.config.AugmentConfig` composes them into one run.

A section that configures a component extends that component's own settings model, declared
beside the code that runs it (``PretrainConfig``, ``AdapterShape``, ``SSLConfig``,
``QualityConfig``), and adds only what the run decides; ``component(**run)`` turns it back into
the component's model. The other sections are the pipeline's own settings.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from anl_core.config import STRICT, AdapterShape, Seed
from pipeline.evaluate.quality_config import QualityConfig
from pipeline.generate.pretrain_config import PretrainConfig
from pipeline.ssl.arm_names import SUPERVISED_ARMS, base_arm
from pipeline.ssl.config import BUDGETS, RECIPES, SSLConfig

Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    """A part of the run's configuration (and the whole, ``AugmentConfig``)."""

    # A misspelt key must fail, naming the key, rather than be ignored; strict types, no inf
    # or nan (anl_core.config.STRICT, shared by the components' own models).
    model_config = STRICT


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


class NeighborsSection(Section):
    """Unlabeled neighbours as extra tuning targets (``pipeline.generate.neighbors``); 0 = off.

    ``per_image``: neighbours per labeled image; ``pool``: unlabeled images searched (each is
    encoded once, in the encode stage); ``self_share``: share of tuning draws that stay on the
    labeled images themselves.
    """

    per_image: int = Field(0, ge=0)
    pool: int = Field(5000, ge=1)
    self_share: Ratio = 0.5
    seed: Seed = 0


class FilterSection(Section):
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
    seed: Seed = 0

    @property
    def enabled(self) -> bool:
        return self.method != "none" or self.copy_quantile > 0


class SamplingSection(Section):
    """Masked, guided sampling: ``per_condition`` images per labeled image and mask ratio."""

    per_condition: int = Field(8, ge=1)
    # strict=False on lists: a tuple from Python code is a list (their items stay strict).
    mask_ratios: list[Ratio] = Field(default_factory=lambda: [0.3], min_length=1, strict=False)
    guidance: float = Field(2.0, ge=0)
    # DDIM takes at most the base's training timesteps (1000 for every shipped base).
    num_inference_steps: int = Field(50, ge=1, le=1000)
    scheduler: Literal["ddim"] = "ddim"
    eta: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1)
    # Conditions per chunk file: a killed sampling stage loses at most one chunk.
    chunk_conditions: int = Field(4, ge=1)
    seed: Seed = 0
    compile: bool = False


class ShardsSection(Section):
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
        default_factory=lambda: ["supervised", "baseline", "augmented", "control"], min_length=1,
        strict=False)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, strict=False)
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


class LoopSection(Section):
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


class FitSection(Section):
    """Does the base model know the data? Before tuning, ``samples`` unconditional samples of
    the base (``steps`` DDIM steps) are compared with ``pool`` images of the task's unlabeled
    pool in the condition encoder's features (``pipeline.evaluate.domain_fit``): KID beside
    the pool's own floor, and the share of samples inside the pool's ``k``-NN manifold. The
    run warns, and the report says so, when that share is below ``min_relative_coverage`` of
    the pool's own share. Calibrated on the shipped Fashion-MNIST bases (bench/RESULTS.md):
    Fashion-MNIST pool 0.71-0.85, inverted Fashion-MNIST 0.16-0.29, digits 0.00.
    """

    enabled: bool = True
    samples: int = Field(64, ge=8, le=4096)
    steps: int = Field(10, ge=1, le=1000)
    pool: int = Field(256, ge=16, le=20000)
    k: int = Field(3, ge=1, le=50)
    min_relative_coverage: Ratio = 0.5
    seed: Seed = 0


class ExportSection(Section):
    """The classifier a run hands out: after the ssl stage, one unit's EMA classifier is
    written to ``classifier/`` (``pipeline.ssl.export``: ``model.safetensors`` and
    ``classifier_config.json``), loadable without the run.

    ``arm``: "best" = the arm with the lowest mean validation error over the seeds (never the
    test error; evaluation arms such as pool-oracle are not candidates), or an arm of
    ``ssl.arms``. ``seed``: which seed's classifier (default: the first of ``ssl.seeds``).
    """

    enabled: bool = True
    arm: str = "best"
    seed: Seed | None = None
