"""Greedy ensemble selection on out-of-fold probabilities (Caruana et al., 2004, without
replacement): the heads of a cross-validated search, averaged, as one candidate.

Every cross-validated trial of a search scores each train/val image once out of fold, on the same
folds (same units, labels and seed). Averaging the probabilities of several good heads and
measuring the mean fold AUC of the average is then as honest as each trial's own value: no image
is scored by a head that trained on it. Starting from the best trial, the trial whose addition
raises that number most joins, until none does or tune.ensemble_size is reached. The ensemble is
a candidate only when it beats the best single head on the same objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from emotr.search.folds import fold_aucs

# A cross-validated trial's out-of-fold probabilities and folds (npz), on its run.
OOF_ARTIFACT = "oof/out_of_fold.npz"
# The pool greedy selection draws from: the best trials by their own value.
POOL_SIZE = 12


@dataclass(frozen=True)
class EnsembleChoice:
    """The trials whose heads are averaged and the objective of the average."""

    trials: tuple[int, ...]
    value: float  # mean fold AUC of the averaged out-of-fold probabilities
    value_std: float
    best_single: float  # the best member's own mean fold AUC (the same computation)


def select_ensemble(
    oof: Mapping[int, tuple[np.ndarray, np.ndarray]],
    values: Mapping[int, float],
    y: np.ndarray,
    max_size: int,
) -> EnsembleChoice | None:
    """The greedy ensemble of up to max_size trials from `oof` ((proba, folds) by trial), drawn
    from the POOL_SIZE best by `values`; None unless two heads or more beat the best alone."""
    pool = _pool(oof, values, y)
    if max_size < 2 or len(pool) < 2:
        return None
    folds = oof[pool[0]][1]

    def objective(members: list[int]) -> float:
        mean = np.mean([oof[number][0] for number in members], axis=0)
        return float(np.mean(fold_aucs(y, mean, folds)))

    chosen, best = [pool[0]], objective([pool[0]])
    single = best
    while len(chosen) < max_size:
        scores = {n: objective([*chosen, n]) for n in pool if n not in chosen}
        if not scores:
            break
        number, score = max(scores.items(), key=lambda item: item[1])
        if score <= best:
            break
        chosen, best = [*chosen, number], score
    if len(chosen) < 2:
        return None
    mean = np.mean([oof[number][0] for number in chosen], axis=0)
    aucs = fold_aucs(y, mean, folds)
    return EnsembleChoice(tuple(chosen), best, float(np.std(aucs)), single)


def _pool(
    oof: Mapping[int, tuple[np.ndarray, np.ndarray]], values: Mapping[int, float], y: np.ndarray
) -> list[int]:
    """The best trials that hold out-of-fold rows for these labels, on the best trial's folds."""
    ranked = sorted((n for n in values if n in oof), key=lambda n: values[n], reverse=True)
    ranked = [n for n in ranked if len(oof[n][0]) == len(y)]
    if not ranked:
        return []
    folds = oof[ranked[0]][1]
    return [n for n in ranked if np.array_equal(oof[n][1], folds)][:POOL_SIZE]
