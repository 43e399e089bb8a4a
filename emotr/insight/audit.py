"""The label audit of the cached features: out-of-fold probabilities, suspected label issues,
near-duplicates and near-blank images of every train and val image (never the test split).

Out-of-fold: a `folds`-fold stratified cross-validation of scikit-learn's logistic regression on
standardised gap5 features, so each image is scored by a model that never saw it. cleanlab's
find_label_issues then flags the images whose given label those probabilities doubt, ranked by
self-confidence (the probability of the given label). Near-duplicates and near-blank images are
cosine similarities of the same features. All of it runs in this process on the cached features:
no Ray, and no backbone but once per cache for the blank references (emotr.insight.blanks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emotr.config import AuditConfig, Config
from emotr.data.listing import Listing, require_classes
from emotr.errors import EmotrError
from emotr.extract.fingerprint import cache_key
from emotr.insight.blanks import BlankReferences, blank_references
from emotr.search.metrics import macro_auc
from emotr.search.training_set import tap_caches
from emotr.taps import DEFAULT_TAP

log = logging.getLogger(__name__)

# Rows of one block of the similarity matrix: 1024 x 20,000 float32 is 80 MB, and a block that
# size keeps BLAS at full speed (the whole 20,000 x 20,000 matrix would be 1.6 GB).
_BLOCK_ROWS = 1024
IMAGE_COLUMNS = ["path", "sha256", "split", "label", "class_name"]


class AuditError(EmotrError, ValueError):
    """A data set the audit cannot score: features not cached, or classes too small to fold."""


@dataclass(frozen=True, eq=False)
class Audit:
    """What `emotr audit` found; every table names each image by path and sha256."""

    out_of_fold: pd.DataFrame  # every audited image: given, suggested, self_confidence, p_<class>
    label_issues: pd.DataFrame  # rank (1 = most suspect), the image, given, suggested, confidence
    near_duplicates: pd.DataFrame  # pairs: path_a, path_b, ..., similarity, same_label
    near_blank: pd.DataFrame  # the image, similarity to its closest blank, that blank's colour
    metrics: dict[str, float]
    fingerprint: str


def audit_listing(
    cfg: Config, listing: Listing, before_backbone: Callable[[], None] | None = None
) -> Audit:
    """Audit the listing's train and val images on their cached gap5 features."""
    classes = require_classes(cfg.data)
    key = cache_key(cfg.cache, cfg.backbone, cfg.decode)
    audited = pd.concat([listing.train(), listing.val()], ignore_index=True)
    images = audited[IMAGE_COLUMNS]
    x = load_features(cfg.cache.root, key.fingerprint, images["sha256"].tolist())
    labels = images["label"].to_numpy(np.int64)
    units = fold_units(audited)
    probabilities = out_of_fold_probabilities(x, labels, len(classes), cfg.audit, units)
    out_of_fold = out_of_fold_table(images, probabilities, classes)
    issues = rank_label_issues(out_of_fold, labels, probabilities)
    pairs = near_duplicate_pairs(standardised(x), cfg.audit.near_duplicate_similarity)
    blanks = blank_references(key, cfg.backbone, cfg.decode, before_backbone)
    near_blank = near_blank_table(images, x, blanks, cfg.audit.near_blank_similarity)
    duplicates = pair_table(images, *pairs)
    metrics = audit_metrics(labels, probabilities, len(issues), duplicates, len(near_blank))
    metrics["folds"] = cfg.audit.folds
    return Audit(out_of_fold, issues, duplicates, near_blank, metrics, key.fingerprint)


def load_features(root: str, fingerprint: str, sha256s: Sequence[str]) -> np.ndarray:
    """Cached gap5 features (n, 512) float32 of `sha256s`, in order; an AuditError for any
    image the cache does not hold, saying to extract first."""
    cache = tap_caches(root, fingerprint, [DEFAULT_TAP])[DEFAULT_TAP]
    missing = set(sha256s) - cache.cached_hashes()
    if missing:
        raise AuditError(
            f"{len(missing)} of {len(set(sha256s))} train/val images have no features in the cache "
            f"{cache.location}: run `emotr extract -c FILE` with the same config (backbone, "
            "decode, cache.root) first; the audit reads cached features only"
        )
    return cache.load(sha256s)


def fold_units(images: pd.DataFrame) -> np.ndarray:
    """What must stay in one fold, per listed image: its manifest group, else its bytes."""
    groups = images["group"].to_numpy()
    return np.where(pd.notna(groups), groups, images["sha256"].to_numpy()).astype(str)


def out_of_fold_probabilities(
    x: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    audit: AuditConfig,
    units: np.ndarray | None = None,
) -> np.ndarray:
    """(n, n_classes) probabilities of each row from a model fitted on the other folds.

    units: rows that must share a fold (copies of one image, a manifest group), else None. A copy
    in another fold would vouch for its twin's label, so then the folds keep units whole.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_foldable(labels, n_classes, audit.folds)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=audit.c, max_iter=audit.max_iter))
    grouped = units is not None and len(np.unique(units)) < len(units)
    splitter = (StratifiedGroupKFold if grouped else StratifiedKFold)(
        n_splits=audit.folds, shuffle=True, random_state=audit.seed
    )
    return cross_val_predict(
        model, x, labels, cv=splitter, groups=units if grouped else None, method="predict_proba"
    )


def _check_foldable(labels: np.ndarray, n_classes: int, folds: int) -> None:
    counts = np.bincount(labels, minlength=n_classes)
    if counts.min() < folds:
        small = [f"label {label}: {count}" for label, count in enumerate(counts) if count < folds]
        raise AuditError(
            f"audit.folds={folds} needs that many train/val images of every class, but "
            f"{', '.join(small)}; lower audit.folds (at least 2) or add images"
        )


def out_of_fold_table(
    images: pd.DataFrame, probabilities: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    """Each image with its given and suggested (argmax) class, self-confidence and p_<class>."""
    labels = images["label"].to_numpy(np.int64)
    names = np.asarray(classes, dtype=object)
    table = images.assign(
        given=names[labels],
        suggested=names[probabilities.argmax(axis=1)],
        self_confidence=probabilities[np.arange(len(labels)), labels],
    )
    for index, name in enumerate(classes):
        table[f"p_{name}"] = probabilities[:, index]
    return table.reset_index(drop=True)


def rank_label_issues(
    out_of_fold: pd.DataFrame, labels: np.ndarray, probabilities: np.ndarray
) -> pd.DataFrame:
    """cleanlab's suspected label issues, most suspect first (lowest self-confidence), rank 1..n."""
    from cleanlab.filter import find_label_issues

    ranked = find_label_issues(
        labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    columns = ["path", "sha256", "split", "given", "suggested", "self_confidence"]
    issues = out_of_fold.loc[ranked, columns].reset_index(drop=True)
    issues.insert(0, "rank", np.arange(1, len(issues) + 1))
    return issues


def standardised(x: np.ndarray) -> np.ndarray:
    """Each feature centred and scaled to unit variance over the rows (constant ones: centred).

    For near-duplicates: pooled VGG features are non-negative and share a large common part, so
    raw cosine similarity cannot tell a copy from a stranger. Measured on 278 demo faces
    (hed-bsds500, 224x224): raw, the median pair of different faces had 0.995; standardised, the
    most similar pair of different faces had 0.93, while a JPEG re-encode (quality 50) of a face
    had 0.991 and an 80 % resize 1.000 (a 95 % crop 0.91, a brightened copy 0.86, a mirror
    image 0.51: those are not caught at 0.98).
    """
    x = np.asarray(x, dtype=np.float32)
    spread = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(spread > 0, spread, np.float32(1))


def near_duplicate_pairs(
    x: np.ndarray, threshold: float, block_rows: int = _BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) of every pair i < j of rows whose cosine similarity is >= threshold.

    In blocks of `block_rows` rows against the rows after them: memory stays at one block of
    the matrix, and each pair is computed once.
    """
    unit = _normalised(x)
    found_i, found_j, found_s = [], [], []
    for start in range(0, len(unit), block_rows):
        block = unit[start : start + block_rows] @ unit[start:].T
        rows, cols = np.nonzero(block >= threshold)
        upper = cols > rows  # the block's own diagonal and below: self and pairs already seen
        rows, cols = rows[upper], cols[upper]
        found_i.append(rows + start)
        found_j.append(cols + start)
        found_s.append(block[rows, cols])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)


def blank_similarity(x: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's highest cosine similarity to a reference row, and which reference it is."""
    similarity = _normalised(x) @ _normalised(references).T
    nearest = similarity.argmax(axis=1)
    return similarity[np.arange(len(x)), nearest], nearest


def near_blank_table(
    images: pd.DataFrame, x: np.ndarray, blanks: BlankReferences, threshold: float
) -> pd.DataFrame:
    """The images whose raw features are within `threshold` cosine of a blank reference's, with
    that similarity and the reference's colour, most blank first."""
    similarity, nearest = blank_similarity(x, blanks.features)
    blank = similarity >= threshold
    names = np.asarray(blanks.names, dtype=object)
    table = images[blank].assign(similarity=similarity[blank], blank=names[nearest[blank]])
    return table.sort_values("similarity", ascending=False).reset_index(drop=True)


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def pair_table(
    images: pd.DataFrame, first: np.ndarray, second: np.ndarray, similarity: np.ndarray
) -> pd.DataFrame:
    """Near-duplicate pairs, most similar first: both images, both labels, same_label."""
    a = images.iloc[first].reset_index(drop=True)
    b = images.iloc[second].reset_index(drop=True)
    table = pd.DataFrame(
        {
            "path_a": a["path"],
            "path_b": b["path"],
            "sha256_a": a["sha256"],
            "sha256_b": b["sha256"],
            "split_a": a["split"],
            "split_b": b["split"],
            "label_a": a["class_name"],
            "label_b": b["class_name"],
            "same_label": (a["label"].to_numpy() == b["label"].to_numpy()),
            "identical": (a["sha256"].to_numpy() == b["sha256"].to_numpy()),
            "similarity": np.asarray(similarity, dtype=np.float64),
        }
    )
    return table.sort_values("similarity", ascending=False, kind="stable").reset_index(drop=True)


def audit_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    n_issues: int,
    duplicates: pd.DataFrame,
    n_blank: int,
) -> dict[str, float]:
    """The audit's numbers: the estimated label-issue rate, counts, out-of-fold accuracy and AUC."""
    n_images = len(labels)
    return {
        "n_images": n_images,
        "n_label_issues": n_issues,
        "label_issue_rate": n_issues / n_images if n_images else 0.0,
        "n_near_duplicate_pairs": len(duplicates),
        "n_near_duplicate_pairs_across_labels": int((~duplicates["same_label"]).sum()),
        "n_near_blank": n_blank,
        "oof_accuracy": float((probabilities.argmax(axis=1) == labels).mean()),
        "oof_macro_auc": macro_auc(labels, probabilities),
    }
