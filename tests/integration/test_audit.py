"""The label audit on real pretrained features, and data.exclude through a whole run.

Acceptance (issue 21): on a copy of the demo set with 5 % of its clearest images moved to the
other class, the audit's top-ranked suspects of the same count hold at least half of them; and
`data.exclude` leaves the listed files out of training, validation and test, the run logs the
count, and the data root is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from emotr import pipeline
from emotr.config_io import load_config
from emotr.data.demo import generate_demo_dataset
from emotr.deploy.registry import get_version, load_evaluation_set, load_validation_set
from emotr.track import Tracker
from tests.conftest import REPO, smoke_config, store_overrides
from tests.run_cli import emotr

pytestmark = pytest.mark.slow

N_IMAGES = 400  # the demo set's size (data.demo_n): 320 of them train/val
FLIPPED_SHARE = 0.05
OTHER = {"negative": "positive", "positive": "negative"}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, ray_local, mlflow_server):
    """The demo set (224x224 hed-bsds500 features extracted) listed by a manifest outside its root
    that moves its clearest 5 % (largest |curvature|) to the other class; the flipped paths."""
    base = tmp_path_factory.mktemp("audit")
    root = base / "demo"
    generate_demo_dataset(root, n=N_IMAGES, size=(400, 500), seed=0)
    manifest = pd.read_csv(root / "manifest.csv")
    manifest["path"] = [str(root / path) for path in manifest["path"]]
    clearest = manifest["curvature"].abs().sort_values(ascending=False).index
    flipped = clearest[: round(FLIPPED_SHARE * len(manifest))]
    manifest.loc[flipped, "label"] = manifest.loc[flipped, "label"].map(OTHER)
    manifest["split"] = ""  # the split rule's
    blanks = write_near_blank_images(base / "blank")
    extra = pd.DataFrame({"path": blanks, "label": "negative", "split": "train"})
    noisy_manifest = base / "noisy.csv"
    pd.concat([manifest[["path", "label", "split"]], extra]).to_csv(noisy_manifest, index=False)
    cfg = load_config(
        [REPO / "conf" / "demo.yaml"],
        [
            f"data.root={root}",
            f"data.manifest={noisy_manifest}",
            "data.generate_demo=false",
            *store_overrides(base),
            f"mlflow.tracking_uri={mlflow_server}",
            "mlflow.experiment=audit",
            "ray.num_cpus=2",
        ],
    )
    summary = pipeline.extract(cfg, Tracker(cfg.mlflow), pipeline.prepare_scan(cfg))
    assert summary.n_failed == 0
    config_file = base / "audit.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, config_file, set(manifest.loc[flipped, "path"]), set(blanks)


def write_near_blank_images(folder: Path) -> list[str]:
    """A grey frame with faint pixel noise and a nearly black one, as a scanner or a lens cap
    gives them (400x500, the demo's size)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for name, level in (("grey", 128), ("dark", 12)):
        pixels = np.clip(level + rng.normal(0, 4, (400, 500, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def test_the_audit_finds_planted_label_errors(noisy):
    cfg, config_file, flipped, blanks = noisy
    done = emotr("audit", "-c", str(config_file))
    assert done.returncode == 0, done.stderr
    assert "suspected label issues" in done.stdout and "MLflow run" in done.stdout
    client = MlflowClient(cfg.mlflow.tracking_uri)
    tracker = Tracker(cfg.mlflow)
    (run,) = tracker.find_runs("attributes.run_name = 'audit'")
    assert run.info.status == "FINISHED" and run.info.run_id in done.stdout
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "audit")}
    assert artifacts == {
        "audit/label_issues.csv",
        "audit/near_duplicates.csv",
        "audit/near_blank.csv",
        "audit/out_of_fold.csv",
        "audit/label_issues_gallery.png",
    }
    assert {"config.yaml", "data"} <= {item.path for item in client.list_artifacts(run.info.run_id)}
    metrics = run.data.metrics
    for name in ("label_issue_rate", "n_label_issues", "oof_accuracy", "oof_macro_auc"):
        assert name in metrics
    assert metrics["folds"] == 5

    def table(name: str) -> pd.DataFrame:
        local = client.download_artifacts(run.info.run_id, f"audit/{name}.csv")
        return pd.read_csv(local)

    out_of_fold = table("out_of_fold")
    assert metrics["n_images"] == len(out_of_fold) == out_of_fold["path"].nunique()
    assert set(out_of_fold["split"]) == {"train", "val"}  # never the test split
    assert {"p_negative", "p_positive", "given", "suggested", "self_confidence"} <= set(
        out_of_fold.columns
    )
    # The flipped images the audit scores (those of the test split it never reads are not).
    audited = flipped & set(out_of_fold["path"])
    issues = table("label_issues")
    top = set(issues["path"].head(len(audited)))
    assert len(top & audited) >= len(audited) / 2, (len(top & audited), len(audited))
    assert metrics["label_issue_rate"] == pytest.approx(len(issues) / len(out_of_fold))
    # Near-blank: the two frames and no face.
    near_blank = table("near_blank")
    assert set(near_blank["path"]) == blanks and metrics["n_near_blank"] == 2
    gallery = client.download_artifacts(run.info.run_id, "audit/label_issues_gallery.png")
    assert Image.open(io.BytesIO(Path(gallery).read_bytes())).format == "PNG"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) by relative path -> sha256 of its bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_exclude_leaves_files_out_of_every_split(tmp_path: Path, ray_local, mlflow_server):
    cfg = smoke_config(
        tmp_path,
        "data.demo_n=40",
        f"mlflow.tracking_uri={mlflow_server}",
        "mlflow.experiment=exclude",
        "registry.model_name=emotr-exclude",
        "tune.n_trials=2",
        "data.test_fraction=0.2",
    )
    pipeline.ensure_demo_data(cfg)
    listing = pipeline.prepare_listing(cfg)
    # A file of each split and one more of train, half named by path, half by their bytes.
    images = listing.images
    chosen = pd.concat([images.groupby("split").head(1), images[images["split"] == "train"][1:2]])
    chosen = chosen.reset_index(drop=True)
    by_path = chosen.index % 2 == 0
    exclude = tmp_path / "reviewed.csv"
    pd.DataFrame(
        {
            "path": chosen["path"].where(by_path, ""),
            "sha256": chosen["sha256"].where(~by_path, ""),
        }
    ).to_csv(exclude, index=False)
    left_out = set(chosen["path"])
    assert set(chosen["split"]) == {"train", "val", "test"}
    before = tree_digest(Path(cfg.data.root))

    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"exclude": str(exclude)})})
    tracker = Tracker(cfg.mlflow)
    result = pipeline.run(cfg, tracker, pipeline.prepare_scan(cfg))

    client = MlflowClient(mlflow_server)
    metrics = client.get_run(result.pipeline_run_id).data.metrics
    assert metrics["n_excluded_files"] == len(left_out)
    assert metrics["n_listed_images"] == len(listing.images) - len(left_out)
    local = client.download_artifacts(result.pipeline_run_id, "data/excluded.csv")
    assert set(pd.read_csv(local)["path"]) == left_out
    listed = pd.read_csv(client.download_artifacts(result.pipeline_run_id, "data/listing.csv"))
    assert not left_out & set(listed["path"])  # training reads the listing's train split
    version = get_version(tracker, "emotr-exclude", cfg.registry.challenger_alias)
    validation = load_validation_set(tracker, version)
    test, split = load_evaluation_set(tracker, version)
    assert split == "test" and len(validation) and len(test)
    assert not left_out & (set(validation["path"]) | set(test["path"]))
    # Nothing else moved split.
    kept = listing.images[~listing.images["path"].isin(left_out)]
    assert dict(zip(listed["path"], listed["split"], strict=True)) == dict(
        zip(kept["path"], kept["split"], strict=True)
    )
    assert tree_digest(Path(cfg.data.root)) == before  # the data root is byte-identical
