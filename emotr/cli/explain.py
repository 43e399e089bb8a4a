"""`emotr explain`: why a registered model decided, as heatmap overlays of its inputs.

The same inputs, model choice and batches as `emotr predict`; the work is
emotr.insight.explain's (a Ray Data job). The registry, Ray and Keras are imported inside the
command, so that `emotr --help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emotr.cli.doctor import connect_ray
from emotr.cli.options import (
    BatchOption,
    ConfigOption,
    ModelOption,
    OverridesThenInputs,
    load_inputs_config,
)
from emotr.cli.output import console, fail, guard, native_stderr_held
from emotr.config_io import DEFAULT_CONFIG


def explain(
    arguments: OverridesThenInputs,
    output: Annotated[
        Path,
        typer.Option(help="Folder for the overlays, contact_sheet.png and explanations.csv."),
    ],
    config: ConfigOption = DEFAULT_CONFIG,
    model: ModelOption = None,
    batch: BatchOption = None,
) -> None:
    """Class activation maps of a registered model (Ray Data job): per image its probabilities
    and an overlay PNG of the map of the predicted class, plus a contact sheet of them all.

    The map: the predicted class's evidence over the image (exact CAM for a linear head,
    Grad-CAM otherwise; the gradient of the head alone, no backward pass through VGG16).
    A bad file is a row of explanations.csv with its reason.
    """
    cfg, inputs = load_inputs_config(config, arguments, batch)
    from emotr.deploy.predict import list_inputs, model_uri, open_predictor
    from emotr.insight.explain import check_output_dir, explain_paths
    from emotr.track import Tracker

    with guard(cfg):
        uri = model_uri(cfg, model)
        check_output_dir(output, inputs)
        paths = list_inputs(inputs)
        with native_stderr_held():  # the driver's TensorFlow start-up lines
            predictor = open_predictor(cfg, Tracker(cfg.mlflow), uri)
        summary = explain_paths(cfg, predictor, paths, output, connect=lambda: connect_ray(cfg))
    sheets = ", ".join(str(path) for path in summary.sheets) or "none (no image could be read)"
    console.print(
        f"{summary.n_images} images, {summary.n_failed} could not be read; wrote "
        f"{summary.n_overlays} overlays and {summary.table}; contact sheet: "
        f"{sheets}",
        highlight=False,
        soft_wrap=True,
    )
    if summary.n_images and summary.n_failed == summary.n_images:
        raise fail(f"none of the {summary.n_images} images could be read")
