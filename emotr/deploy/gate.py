"""The promotion gate's statistics: paired bootstrap of an AUC difference (macro one-vs-rest AUC
for more than two classes), and the decision.

Pure numpy + scikit-learn: no MLflow, no Keras. Both models are scored on the same images, so the
resamples draw image indices once and score both models on them (paired): what the two models get
right or wrong together cancels out, and the interval is much tighter than two separate ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emotr.search.metrics import as_probabilities, macro_auc


@dataclass(frozen=True)
class Comparison:
    """AUC of a challenger and a champion on the same images, and the interval of their gap."""

    auc_challenger: float
    auc_champion: float
    low: float  # of the 95 % interval of auc_challenger - auc_champion
    high: float
    n_images: int
    n_resamples: int  # resamples holding two classes or more (the others have no AUC)
    n_classes: int = 2  # > 2: the AUCs are macro one-vs-rest AUCs

    @property
    def delta(self) -> float:
        """AUC(challenger) - AUC(champion) on all the images."""
        return self.auc_challenger - self.auc_champion


@dataclass(frozen=True)
class Decision:
    """Whether the champion alias moves to the challenger, and why, in one sentence."""

    promote: bool
    reason: str


def compare_auc(
    y_true: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Comparison:
    """Paired bootstrap (percentile) interval of AUC(challenger) - AUC(champion): the binary AUC
    for two classes, the macro one-vs-rest AUC for more. Scores are the (n,) P(class 1) of a
    sigmoid head or (n, K) class probabilities; labels are class indexes 0..K-1."""
    y_true = np.asarray(y_true)
    challenger, champion = as_probabilities(challenger), as_probabilities(champion)
    if not len(y_true) == len(challenger) == len(champion):
        raise ValueError(
            f"labels and scores differ in length: {len(y_true)}, {len(challenger)}, {len(champion)}"
        )
    n_classes = challenger.shape[1]
    if champion.shape[1] != n_classes:
        raise ValueError(
            f"the challenger scores {n_classes} classes and the champion {champion.shape[1]}: "
            "their AUCs do not compare; compare models of the same classes"
        )
    if len(np.unique(y_true)) < 2:
        needed = "both classes" if n_classes == 2 else f"two or more of the {n_classes} classes"
        raise ValueError(f"AUC needs images of {needed}; the comparison set has one class")
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_resamples):
        rows = rng.integers(0, len(y_true), len(y_true))
        y = y_true[rows]
        if y.min() == y.max():  # one class drawn: no AUC; skipped, not redrawn (stays seeded)
            continue
        deltas.append(macro_auc(y, challenger[rows]) - macro_auc(y, champion[rows]))
    if not deltas:
        raise ValueError(f"no bootstrap resample of {len(y_true)} images held two classes")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return Comparison(
        auc_challenger=macro_auc(y_true, challenger),
        auc_champion=macro_auc(y_true, champion),
        low=float(low),
        high=float(high),
        n_images=len(y_true),
        n_resamples=len(deltas),
        n_classes=n_classes,
    )


def decide(comparison: Comparison | None, min_delta: float, force: bool = False) -> Decision:
    """Promote when there is no champion, when forced, or when the interval lies above min_delta."""
    if comparison is None:
        return Decision(True, "no champion yet: the challenger becomes the champion")
    auc = "AUC" if comparison.n_classes == 2 else "macro AUC"
    gap = (
        f"{auc} challenger {comparison.auc_challenger:.4f} vs champion "
        f"{comparison.auc_champion:.4f}, difference {comparison.delta:+.4f}, 95 % interval "
        f"[{comparison.low:+.4f}, {comparison.high:+.4f}] on {comparison.n_images} images"
    )
    if comparison.low > min_delta:
        return Decision(True, f"{gap}: its lower end is above min_delta {min_delta:g}")
    if force:
        return Decision(True, f"{gap}: promoted anyway (--force)")
    return Decision(
        False,
        f"{gap}: its lower end is not above min_delta {min_delta:g}, so the champion stays "
        "(--force promotes anyway)",
    )
