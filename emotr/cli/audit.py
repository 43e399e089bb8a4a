"""`emotr audit`: the label audit of the cached features, printed and recorded as an MLflow run.

No Ray: the audit fits its cross-validated logistic regressions in this process, on the
features `emotr extract` cached. The pipeline and MLflow are imported inside the command, so
that `emotr --help` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from emotr.cli.doctor import check_before_work, require_green
from emotr.cli.options import ConfigOption, Overrides, load_command_config
from emotr.cli.output import console, guard, load_keras_quietly
from emotr.config_io import DEFAULT_CONFIG

if TYPE_CHECKING:
    import pandas as pd

_SHOWN = 10  # suspects printed; every one is in label_issues.csv of the run


def audit(config: ConfigOption = DEFAULT_CONFIG, overrides: Overrides = None) -> None:
    """Audit the labels (no Ray, on cached features): suspected label issues, near-duplicates,
    near-blank images of train and val, as an MLflow run `audit`; run `emotr extract` first.

    Out-of-fold probabilities from an audit.folds-fold cross-validation of a logistic
    regression, ranked by cleanlab. Nothing in the data is changed: list the files a person
    confirmed wrong in a CSV and set data.exclude to it.
    """
    from emotr import pipeline
    from emotr.ops.doctor import check_artifacts, check_tracking
    from emotr.track import Tracker, ui_command

    cfg = load_command_config(config, overrides)
    with guard(cfg):
        check_before_work(cfg)
        listing = pipeline.prepare_listing(cfg)
        require_green([check_tracking(cfg.mlflow), check_artifacts(cfg.mlflow)])
        run_id, found = pipeline.audit(cfg, Tracker(cfg.mlflow), listing, load_keras_quietly)
    metrics = found.metrics
    console.print(
        f"audited {metrics['n_images']:.0f} train/val images ({cfg.audit.folds}-fold out-of-fold "
        f"accuracy {metrics['oof_accuracy']:.3f}, macro AUC {metrics['oof_macro_auc']:.3f}): "
        f"{metrics['n_label_issues']:.0f} suspected label issues "
        f"({metrics['label_issue_rate']:.1%}), {metrics['n_near_duplicate_pairs']:.0f} "
        f"near-duplicate pairs ({metrics['n_near_duplicate_pairs_across_labels']:.0f} across "
        f"labels), {metrics['n_near_blank']:.0f} near-blank images"
    )
    if len(found.label_issues):
        console.print(_suspects_table(found.label_issues.head(_SHOWN)))
    console.print(
        f"MLflow run {run_id} (audit/*.csv: every path; audit/label_issues_gallery.png); "
        f"open the UI: {ui_command(cfg.mlflow)}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        "after review, list the wrong files (path or sha256 column) in a CSV and rerun with "
        "data.exclude=FILE.csv",
        style="dim",
    )


def _suspects_table(issues: pd.DataFrame) -> Table:
    """The most suspect images: rank, whole path, given and suggested label, self-confidence."""
    table = Table("rank", "image", "given", "suggested", "self-confidence")
    table.columns[1].overflow = "fold"
    for row in issues.itertuples(index=False):
        table.add_row(
            str(row.rank), row.path, row.given, row.suggested, f"{row.self_confidence:.2g}"
        )
    return table
