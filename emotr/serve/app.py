"""The Ray Serve application of `emotr serve`: one deployment whose FastAPI ingress decodes
uploads and whose batches share VGG passes across concurrent requests.

- POST /predict: image files (multipart, the tutorial's endpoint, or one raw image body) -> rows
  {file, label, p_<class>..., error} and the version that answered; a single bad file is a 422.
- POST /invocations: MLflow's scoring protocol (base64 `image`), as `mlflow models serve` answers.
- POST /explain: /predict's rows, each with the heatmap of its predicted class (a PNG data: URI).
- GET / (the page, emotr/serve/page.html), GET /healthz (200 once a version is loaded),
  GET /version (name, version, alias, classes, lineage).
`?model=challenger` sends a request to the challenger instead (serve.challenger).

Every answer carries the version that computed it (the `model` field and the X-Emotr-Version
header); emotr.serve.versions keeps each replica on the alias it follows. This module imports
Ray Serve and FastAPI at the top: only `emotr serve` and Serve's replicas import it.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations as objects,
# and Serve ships the class by value, without the module globals a string annotation names.

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import metrics
from ray.serve.deployment import Application

from emotr.config import Config, ExtractConfig, MlflowConfig, ServeConfig
from emotr.deploy.registry import open_registry
from emotr.deploy.serving import prediction_frame
from emotr.extract.runtime import configure_tensorflow, use_environment, worker_environment
from emotr.insight.cam import CamError, map_grid
from emotr.serve.batching import (
    BatchItem,
    Explained,
    PassQueue,
    batch_outputs,
    decode_all,
    overlay_data_uri,
)
from emotr.serve.page import page_html
from emotr.serve.uploads import Limits, invocation_images, read_body, read_uploads
from emotr.serve.versions import FollowedVersion, ModelRef, ServedVersion

log = logging.getLogger("ray.serve.emotr")  # Serve's replica logs hold "ray.serve"'s children

VERSION_HEADER = "X-Emotr-Version"
MAIN, CHALLENGER = "champion", "challenger"  # the names `?model=` takes
Result = TypeVar("Result")

api = FastAPI(title="emotr", docs_url=None, redoc_url=None)  # /docs loads scripts from a CDN


class ServerSettings(BaseModel):
    """What a replica needs: the serve section, the registry, the references it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serve: ServeConfig
    extract: ExtractConfig  # the Keras backend and TensorFlow's quiet start-up
    tracking_uri: str  # absolute: replicas run elsewhere
    model_name: str
    model_ref: str  # alias (followed) or version number
    challenger_ref: str | None = None
    explain_alpha: float = 0.5  # the heatmap's opacity in /explain's overlays (explain.alpha)


def server_settings(cfg: Config, main: ModelRef, challenger: ModelRef | None) -> ServerSettings:
    """The settings of a replica serving `main` (and `challenger`) of cfg's registry."""
    if challenger is not None and challenger.name != main.name:
        raise ValueError("the challenger must be a version of the served model")
    return ServerSettings(
        serve=cfg.serve,
        extract=cfg.extract,
        tracking_uri=open_registry(cfg.mlflow).uri,
        model_name=main.name,
        model_ref=main.ref,
        challenger_ref=challenger.ref if challenger else None,
        explain_alpha=cfg.explain.alpha,
    )


def _prepare_process(settings: ServerSettings) -> None:
    """Keras' backend and quiet TensorFlow before Keras loads; as many threads as CPUs."""
    use_environment(worker_environment(settings.extract), node="serve replica")
    configure_tensorflow(max(1, round(settings.serve.cpus_per_replica)))


# Helpers the class calls are defined above it: Serve pickles the class when it is decorated.
@serve.deployment(name="EmotrServer", max_constructor_retry_count=3)
@serve.ingress(api)
class EmotrServer:
    """One replica: the served version (and the challenger), batching, the endpoints."""

    async def __init__(self, settings: ServerSettings):
        _prepare_process(settings)
        cfg = settings.serve
        reader = open_registry(MlflowConfig(tracking_uri=settings.tracking_uri))
        refs = {MAIN: settings.model_ref, CHALLENGER: settings.challenger_ref}
        self.models = {
            key: FollowedVersion(
                reader, ModelRef(settings.model_name, ref), cfg.max_batch_size, cfg.follow_s
            )
            for key, ref in refs.items()
            if ref is not None
        }
        self.limits = Limits(int(cfg.max_upload_mb * 2**20), cfg.max_files)
        self.timeout_s = cfg.request_timeout_s
        self.alpha = settings.explain_alpha
        self.passes = PassQueue(self._run_pass, cfg.max_batch_size)
        self.batch_wait_s = cfg.batch_wait_s
        self.scoring = 0  # requests between their decode and their answer
        self.images = metrics.Counter(
            "emotr_images", "Images answered, by version and outcome", ("version", "outcome")
        )
        self.batch_images = metrics.Histogram(
            "emotr_batch_images", "Images per VGG pass", [1, 2, 4, 8, 16, 32, 64, 128, 256]
        )
        # Ready (Serve routes to it) only once the served version is loaded.
        await self.models[MAIN].get()
        self._followers = [asyncio.create_task(m.follow()) for m in self.models.values()]

    def check_health(self) -> None:
        """Serve's health check: the served version is loaded."""
        if self.models[MAIN].current is None:
            raise RuntimeError("no version loaded")

    def _followed(self, model: str | None) -> FollowedVersion:
        key = MAIN if model in (None, "", MAIN) else model
        if key not in self.models:
            known = ", ".join(sorted(self.models))
            raise HTTPException(400, f"model={model!r}: this application serves {known}")
        return self.models[key]

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 with the version once one is loaded; 503 before."""
        served = self.models[MAIN].current
        if served is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": served.answer()})

    @api.get("/version")
    async def version(self, model: str | None = None) -> JSONResponse:
        """name, version, alias, classes and lineage tags of the version that answers."""
        served = await self._followed(model).get()
        return JSONResponse(served.describe(), headers={VERSION_HEADER: served.version})

    @api.post("/predict")
    async def predict(self, request: Request, model: str | None = None) -> JSONResponse:
        """Uploaded image files -> one row each; a request of one unreadable file is a 422."""
        return await self._answer_uploads(request, model, explain=False)

    @api.post("/invocations")
    async def invocations(self, request: Request, model: str | None = None) -> JSONResponse:
        """MLflow's scoring protocol: {"predictions": [rows]}, as `mlflow models serve` answers."""
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("application/json"):
            raise HTTPException(
                415,
                f"/invocations reads application/json in MLflow's format, not "
                f"{content_type or 'a body without Content-Type'}; image files go to /predict",
            )
        followed = self._followed(model)
        values = invocation_images(await read_body(request, self.limits))
        if len(values) > self.limits.max_files:
            raise HTTPException(
                413, f"more than serve.max_files ({self.limits.max_files}) rows in one request"
            )
        served = await followed.get()
        frame = await self._within_timeout(self._score(served, values))
        return JSONResponse(
            {"predictions": frame.to_dict("records")}, headers={VERSION_HEADER: served.version}
        )

    @api.post("/explain")
    async def explain(self, request: Request, model: str | None = None) -> JSONResponse:
        """/predict's rows, each with the heatmap of its predicted class over the image."""
        return await self._answer_uploads(request, model, explain=True)

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        """The page: drop images, see each one's emotion, its bars and its heatmap."""
        return HTMLResponse(page_html())

    async def _answer_uploads(
        self, request: Request, model: str | None, explain: bool
    ) -> JSONResponse:
        """{"model", "rows"}: a row per uploaded file (its name first); one bad file is a 422."""
        followed = self._followed(model)
        uploads = await read_uploads(request, self.limits)
        served = await followed.get()
        datas = [upload.data for upload in uploads]
        if explain:
            rows = await self._within_timeout(self._explained_rows(served, datas))
        else:
            rows = (await self._within_timeout(self._score(served, datas))).to_dict("records")
        rows = [{"file": u.name, **row} for u, row in zip(uploads, rows, strict=True)]
        status = 422 if len(rows) == 1 and rows[0]["error"] else 200
        body: dict[str, Any] = {"model": served.answer(), "rows": rows}
        if status == 422:
            body["detail"] = f"{rows[0]['file']}: {rows[0]['error']}"
        return JSONResponse(body, status_code=status, headers={VERSION_HEADER: served.version})

    async def _within_timeout(self, work: Awaitable[Result]) -> Result:
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except TimeoutError:
            raise HTTPException(
                504,
                f"no answer within serve.request_timeout_s ({self.timeout_s:g} s): the replicas "
                "are busy; retry, send fewer images per request, or add replicas",
            ) from None

    async def _score(self, served: ServedVersion, values: Sequence[Any]) -> pd.DataFrame:
        """The output frame of `values` (bytes or base64 text), as the pyfunc model's score."""
        decoded, good, answers = await self._decoded_outputs(served, values, explain=False)
        return self._frame(served, decoded, good, answers)

    async def _decoded_outputs(
        self, served: ServedVersion, values: Sequence[Any], explain: bool
    ) -> tuple[list, list[int], list[np.ndarray | Explained]]:
        """The values decoded, the indices of the images among them, and their outputs from
        the shared batches. A lone image of the only request in flight starts its pass at once:
        nothing would join it in serve.batch_wait_s."""
        self.scoring += 1
        try:
            decoded = await asyncio.to_thread(decode_all, served.scorer, values)
            good = [i for i, item in enumerate(decoded) if not isinstance(item, str)]
            alone = len(good) == 1 and self.scoring == 1
            items = [BatchItem(served, decoded[i].pixels, explain) for i in good]
            answers = await self.passes.submit(items, 0.0 if alone else self.batch_wait_s)
        finally:
            self.scoring -= 1
        return decoded, good, answers

    def _frame(self, served: ServedVersion, decoded: list, good: list[int], answers: list):
        """prediction_frame of a request's answers; counts its images by outcome."""
        probabilities = np.full((len(decoded), len(served.classes)), np.nan)
        if good:
            probabilities[good] = np.stack([getattr(a, "proba", a) for a in answers])
        errors = [item if isinstance(item, str) else None for item in decoded]
        for outcome, count in (("scored", len(good)), ("unreadable", len(decoded) - len(good))):
            if count:  # Ray's counters refuse an increment of 0
                self.images.inc(count, {"version": served.version, "outcome": outcome})
        return prediction_frame(probabilities, errors, served.scorer.spec)

    async def _explained_rows(self, served: ServedVersion, datas: list[bytes]) -> list[dict]:
        """/predict's rows plus `overlay` (a PNG data: URI of the predicted class's map over
        the image) and `overlay_error` (why there is none)."""
        try:  # the CamModel itself is built in the batch's thread, beside the VGG passes
            map_grid(served.scorer.spec)
            no_map = None
        except CamError as error:  # an ensemble: its probabilities, no map
            no_map = str(error)
        decoded, good, answers = await self._decoded_outputs(served, datas, no_map is None)
        rows = self._frame(served, decoded, good, answers).to_dict("records")
        for row in rows:
            row["overlay"], row["overlay_error"] = None, row["error"] or no_map
        for i, answer in zip(good, answers, strict=True):
            if isinstance(answer, Explained):
                rows[i]["overlay"] = await asyncio.to_thread(
                    overlay_data_uri,
                    datas[i],
                    decoded[i],
                    answer.raw_map,
                    served.scorer.spec,
                    self.alpha,
                )
        return rows

    async def _run_pass(self, items: list[BatchItem]) -> list[np.ndarray | Explained]:
        self.batch_images.observe(len(items))
        started = time.perf_counter()
        # The VGG pass in a thread: the event loop goes on reading requests into the next batch.
        results = await asyncio.to_thread(batch_outputs, items)
        log.debug("scored %d images in %.3f s", len(items), time.perf_counter() - started)
        return results


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve's options of the deployment from the serve section."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.replicas
    return options


def application(settings: ServerSettings) -> Application:
    """The bound application: the EmotrServer deployment with serve.*'s options."""
    return EmotrServer.options(**deployment_options(settings.serve)).bind(settings)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder (`import_path: emotr.serve.app:build_app`, as `emotr
    serve --build` writes it): args `settings`, a ServerSettings as JSON."""
    return application(ServerSettings.model_validate(args["settings"]))
