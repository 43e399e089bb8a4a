"""The `emotr` command as a user runs it: a real subprocess, real files, exit codes and messages."""

import io
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

from emotr.cli.jobs import validation_line
from emotr.cli.options import GRAMMAR, split_overrides
from emotr.config_io import load_config
from emotr.hyperparams import HeadParams
from emotr.pipeline import RunResult
from emotr.search.report import SearchResult
from emotr.search.top_trials import top_table
from tests.run_cli import emotr

# Every command that reads a config: one grammar, `-c FILE` then section.key=value overrides.
CONFIG_COMMANDS = [
    ["extract"], ["tune"], ["run"], ["promote"], ["predict"], ["explain"], ["audit"], ["doctor"],
    ["cache", "ls"], ["cache", "verify"], ["cache", "gc"], ["cache", "compact"],
    ["cache", "export"],
]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "key"),
    [("tune.n_trials=abc", "tune.n_trials"), ("tune.n_trails=3", "tune.n_trails")],
)
def test_bad_override_fails_before_any_work_naming_the_key(override, key):
    result = emotr("run", "-c", "conf/demo.yaml", override)
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_data_root_with_an_empty_class_folder_names_that_folder(tmp_path: Path):
    root = tmp_path / "data"
    (root / "negative").mkdir(parents=True)
    (root / "positive" / "nested").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "negative" / "a.png")
    (root / "positive" / "notes.txt").write_text("not an image")
    result = emotr(
        "extract",
        "-c",
        "conf/smoke.yaml",
        f"data.root={root}",
        "data.generate_demo=false",
        f"cache.root={tmp_path / 'cache'}",
    )
    assert result.returncode == 1
    assert str(root / "positive") in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command", ["demo-data", "extract", "tune", "run", "promote", "predict", "explain", "audit"]
)
def test_every_subcommand_documents_itself(command):
    result = emotr(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_demo_data_writes_both_classes_and_prints_the_ceiling(tmp_path: Path):
    result = emotr(
        "demo-data", str(tmp_path / "demo"), "--n", "6", "--size", "64x80", "--seed", "3"
    )
    assert result.returncode == 0, result.stderr
    assert "Bayes ceiling" in result.stdout
    assert any((tmp_path / "demo" / "negative").iterdir())
    assert any((tmp_path / "demo" / "positive").iterdir())
    again = emotr("demo-data", str(tmp_path / "demo"), "--n", "6")
    assert again.returncode == 2 and "demo" in again.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    (Path.home() / ".keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").exists(),
    reason="ImageNet weights are cached here, so nothing fails",
)
def test_unreachable_imagenet_weights_fail_with_the_alternatives(tmp_path: Path):
    result = emotr(
        "extract",
        "-c",
        "conf/smoke.yaml",
        "backbone.weights=imagenet",
        f"data.root={tmp_path / 'data'}",
        f"cache.root={tmp_path / 'cache'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"mlflow.artifact_location={tmp_path / 'mlartifacts'}",
    )
    assert result.returncode == 1
    assert "backbone.weights=hed-bsds500" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache").rglob("part-*.parquet"))


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
def test_every_command_that_reads_a_config_shows_the_same_grammar(command):
    result = emotr(*command, "--help", env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    usage = text[text.index("Usage:") : text.index(command[-1]) + 200]
    assert "[section.key=value]..." in usage
    assert "--config -c" in text
    assert GRAMMAR in text


def test_predict_refuses_a_misspelled_override_naming_it_before_any_work(tmp_path: Path):
    result = emotr("predict", "-c", "conf/smoke.yaml", "tune.n_trails=3", str(tmp_path))
    assert result.returncode == 2
    assert "tune.n_trails: unknown key; did you mean tune.n_trials?" in result.stderr
    assert "champion" not in result.stderr  # it did not go looking for a model
    assert "Traceback" not in result.stderr


def test_predict_tells_overrides_from_inputs():
    arguments = [
        "mlflow.tracking_uri=sqlite:///other.db",
        "photos/",
        "./tune.n_trials=3.jpg",  # a file whose name holds '=': given as ./NAME
        "a=b.jpg",
        "dir/x.y=1.png",
        "tune.baseline.units=64",
    ]
    overrides, inputs = split_overrides(arguments)
    assert overrides == ["mlflow.tracking_uri=sqlite:///other.db", "tune.baseline.units=64"]
    assert inputs == ["photos/", "./tune.n_trials=3.jpg", "a=b.jpg", "dir/x.y=1.png"]


def test_an_override_that_is_also_a_file_says_how_to_give_the_file(tmp_path: Path):
    (tmp_path / "happy.face=1.jpg").write_bytes(b"")
    result = emotr("predict", "happy.face=1.jpg", cwd=tmp_path)
    assert result.returncode == 2
    said = " ".join(result.stderr.split())
    assert "happy: unknown key" in said and "write ./happy.face=1.jpg" in said


def _search(rows: list[dict]) -> SearchResult:
    trials = pd.DataFrame(
        [
            {"number": i, "value": value, "state": "COMPLETE"}
            | {f"param_{k}": v for k, v in HeadParams(**params).model_dump().items()}
            for i, (value, params) in enumerate(rows)
        ]
    )
    return SearchResult("s", 0, None, None, None, None, None, len(rows), 0, 0, 0, [], trials, "", 0)


def _rendered(result: SearchResult, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width).print(top_table(result))
    return out.getvalue()


def test_top_trials_in_a_log_show_the_objective_whole_and_only_params_that_vary():
    searched = {
        "n_layers": 2, "units": 128, "activation": "gelu", "dropout": 0.31, "l2": 1.5e-05,
        "learning_rate": 0.00043, "batch_size": 64, "standardize": True, "class_weight": True,
    }  # fmt: skip
    result = _search([(0.876543, {}), (0.912345, searched), (0.801, {"units": 64})])
    for width in (80, 60, 40):  # a log (80 columns) and narrower terminals
        text = _rendered(result, width)
        assert "0.9123" in text and "0.8765" in text and "0.8010" in text, text
        assert "…" not in text
        for varying in ("units", "lr", "drop", "layers", "batch"):
            assert varying in text
        for constant in ("finetune", "ft lr", "features", "gap5"):
            assert constant not in text  # equal in every trial: left out
    best_first = _rendered(result, 80)
    assert best_first.index("0.9123") < best_first.index("0.8765") < best_first.index("0.8010")


def test_top_trials_fit_an_80_column_log_as_a_table_when_they_can():
    result = _search([(0.9, {"units": 64}), (0.8, {"units": 512})])
    text = _rendered(result, 80)
    header = next(line for line in text.splitlines() if "val AUC" in line)
    assert header.split() == ["trial", "val", "AUC", "units"]
    assert max(len(line) for line in text.splitlines()) <= 80


def test_ray_datas_issue_detectors_stay_off_the_console_its_warnings_do_not():
    import logging

    from emotr.cli.output import quiet_ray_data_console

    quiet_ray_data_console()
    (console,) = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]
    n_filters = len(console.filters)
    quiet_ray_data_console()  # a second command in the same process adds no second filter

    def record(name: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, "uses 2.5GiB", None, None)

    detector = "ray.data._internal.issue_detection.issue_detector_manager"
    assert not console.filter(record(detector))
    assert console.filter(record("ray.data._internal.execution.streaming_executor"))
    assert len(console.filters) == n_filters


def _run_result(best_val_auc_std: float | None) -> RunResult:
    return RunResult(
        pipeline_run_id="r",
        best_val_auc=0.81,
        baseline="0.7500",
        best_trial_number=7,
        model_name="emotr",
        model_version="1",
        n_images=10,
        n_failed=0,
        peer="0.7800",
        best_val_auc_std=best_val_auc_std,
    )


def test_the_closing_line_names_the_number_each_best_trial_was_scored_by():
    folds = load_config([], ["tune.cv_folds=6"])
    line = validation_line(folds, _run_result(0.01))
    assert "6-fold cross-validated AUC over train + val: best 0.8100 +- 0.0100" in line
    assert "one validation split" not in line
    # A fine-tuning trial has no folds: its number is the one split's, and the line says so.
    tuned = validation_line(folds, _run_result(None))
    assert "(trial 7, fine-tuned: on the one validation split, optimistic)" in tuned
    single = validation_line(load_config([], ["tune.cv_folds=0"]), _run_result(None))
    assert single.startswith("[bold]validation AUC (the split the best was chosen on")
    assert "fine-tuned" not in single and "the plain peer 0.7800" in single
