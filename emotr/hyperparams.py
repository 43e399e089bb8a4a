"""A head's hyperparameters (HeadParams) and the Optuna search space over them, as validated
config: tune.baseline is one HeadParams, tune.search_space a SearchSpace (emotr.config).

Adding a hyperparameter: a field of HeadParams (default and allowed range) and its use in
emotr.search.head; tune.search_space may then name it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from emotr.taps import DEFAULT_FEATURES, parse_features


class StrictModel(BaseModel):
    """A frozen model that refuses unknown keys: every config section and HeadParams."""

    # extra="forbid" turns a typo such as tune.n_trails into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


MAX_HEAD_LAYERS = 3


class HeadParams(StrictModel):
    """Hyperparameters of a head; the defaults are the tutorial's recipe (tune.baseline).

    Adding a hyperparameter: a field here (default and allowed range) and its use in
    emotr.search.head; tune.search_space may then name it.
    """

    n_layers: int = Field(1, ge=0, le=MAX_HEAD_LAYERS)
    units: int = Field(512, ge=1)
    activation: str = "relu"  # a Keras activation name, checked when the head is built
    kernel_init: Literal["he_normal", "glorot_uniform"] = "he_normal"  # of the hidden layers
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    l2: float = Field(0.0, ge=0.0)
    learning_rate: float = Field(1e-4, gt=0.0)
    batch_size: int = Field(32, ge=1)
    standardize: bool = False
    class_weight: bool = False
    # false: every epoch, the last kept (the tutorial's); true: stop early, best epoch restored.
    early_stopping: bool = False
    # The cached taps the head reads: e.g. gap5, gap4+gap5, gap5_flipavg (emotr.taps).
    features: str = DEFAULT_FEATURES
    # adam: the Keras head trained by Adam (the tutorial's); logreg_cv: scikit-learn's
    # LogisticRegressionCV on standardised features, its L2 chosen by an inner cross-validation
    # of the training rows, its coefficients written into a linear Keras head (the plain peer).
    solver: Literal["adam", "logreg_cv"] = "adam"
    # Train on the cached augmented views (extract.views): one view per image per epoch, drawn
    # anew each epoch, on the training rows only (validation reads the plain image).
    train_views: bool = False
    # Deep fine-tuning (emotr.search.finetune): the blocks above extract.cache_activation train
    # with the head at learning_rate * finetune_lr_scale, up to finetune_epochs after its fit.
    finetune: bool = False
    finetune_lr_scale: float = Field(0.1, gt=0.0, le=1.0)
    finetune_epochs: int = Field(10, ge=1)
    finetune_patience: int = Field(3, ge=1)

    @field_validator("features")
    @classmethod
    def _valid_features(cls, value: str) -> str:
        parse_features(value)
        return value

    @model_validator(mode="after")
    def _solver_fits(self) -> HeadParams:
        if self.solver == "logreg_cv" and (self.n_layers or self.finetune or self.train_views):
            raise ValueError(
                "solver logreg_cv fits a linear head on the plain features: it needs n_layers 0, "
                f"finetune and train_views false, got n_layers {self.n_layers}, finetune "
                f"{self.finetune}, train_views {self.train_views}"
            )
        return self


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"low {low} must be <= high {high}")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0, got low {low}")


class FloatSpace(StrictModel):
    """A float in [low, high]: uniform, log-uniform (log) or on a grid (step)."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _valid_range(self) -> FloatSpace:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna samples one or the other)")
        return self


class IntSpace(StrictModel):
    """An integer in [low, high] (both included), every step-th, or log-uniform (log)."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _valid_range(self) -> IntSpace:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("log needs step 1 (Optuna samples one or the other)")
        return self


class CategoricalSpace(StrictModel):
    """One of a non-empty list of choices."""

    type: Literal["categorical"]
    choices: tuple[bool | int | float | str, ...] = Field(min_length=1)


# One entry of tune.search_space; `type` says which.
ParamSpace = Annotated[FloatSpace | IntSpace | CategoricalSpace, Field(discriminator="type")]
SearchSpace = dict[str, ParamSpace]


def check_space(name: str, space: ParamSpace, baseline: HeadParams) -> None:
    """A space must name a HeadParams field and hold only values the head accepts."""
    fields = HeadParams.model_fields
    if name not in fields:
        raise ValueError(f"{name} is not a head parameter; allowed: {', '.join(fields)}")
    if isinstance(space, FloatSpace) and fields[name].annotation is not float:
        raise ValueError(f"{name} takes {fields[name].annotation.__name__} values, not floats")
    values = space.choices if isinstance(space, CategoricalSpace) else (space.low, space.high)
    for value in values:
        try:
            HeadParams.model_validate({**baseline.model_dump(), name: value})
        except ValidationError as error:
            reason = error.errors()[0]["msg"]
            raise ValueError(f"{name}: {value!r} is not a valid {name} ({reason})") from None
