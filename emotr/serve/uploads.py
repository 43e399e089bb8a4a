"""What a request carries: uploaded files (multipart or a raw image body) and MLflow's scoring
protocol, read within the configured limits. Each refusal is an HTTPException whose detail says
what was wrong and how to send it instead.

The body is read as a stream and refused (413) as soon as it passes serve.max_upload_mb, whatever
its Content-Length says: a client cannot make a replica hold more than the limit.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

# Content types of a raw body that is one image (curl --data-binary @photo.jpg).
RAW_TYPES = ("image/", "application/octet-stream")
PREDICT_HINT = "send images as multipart form fields: curl -F file=@photo.jpg URL/predict"


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_bytes: int
    max_files: int


@dataclass(frozen=True)
class Upload:
    """One uploaded image: the name its client gave it, and its bytes."""

    name: str
    data: bytes


class BodyTooLarge(Exception):
    """The body passed the limit while it was read."""


async def _limited(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > max_bytes:
            raise BodyTooLarge
        yield chunk


def _too_large(limits: Limits) -> HTTPException:
    return HTTPException(
        413,
        f"request body over serve.max_upload_mb ({limits.max_bytes / 2**20:g} MB): send fewer "
        "or smaller images per request",
    )


def _check_length(request: Request, limits: Limits) -> None:
    """Refuse a declared body over the limit before reading any of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise _too_large(limits)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The whole body, at most limits.max_bytes of it (413 beyond)."""
    _check_length(request, limits)
    try:
        return b"".join([chunk async for chunk in _limited(request.stream(), limits.max_bytes)])
    except BodyTooLarge:
        raise _too_large(limits) from None


async def read_uploads(request: Request, limits: Limits) -> list[Upload]:
    """The images of a /predict request: every file field of a multipart form, or a raw image
    body. 400 when there is none, 413 over the limits, 415 for another content type."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        uploads = await _form_files(request, limits)
    elif content_type.startswith(RAW_TYPES):
        body = await read_body(request, limits)
        uploads = [Upload("body", body)] if body else []
    elif content_type.startswith("application/x-www-form-urlencoded"):
        uploads = []  # a form of text fields only: no file in it
    elif not content_type and not await read_body(request, limits):
        uploads = []
    else:
        raise HTTPException(
            415,
            f"/predict reads image files, not {content_type or 'a body without Content-Type'}: "
            f"{PREDICT_HINT}; JSON in MLflow's format goes to /invocations",
        )
    if not uploads:
        raise HTTPException(400, f"no image in the request: {PREDICT_HINT}")
    return uploads


async def _form_files(request: Request, limits: Limits) -> list[Upload]:
    _check_length(request, limits)
    stream = _limited(request.stream(), limits.max_bytes)
    parser = MultiPartParser(request.headers, stream, max_files=limits.max_files)
    try:
        form = await parser.parse()
    except BodyTooLarge:
        raise _too_large(limits) from None
    except MultiPartException as error:
        if "too many files" in str(error).lower():
            raise HTTPException(
                413,
                f"more than serve.max_files ({limits.max_files}) images in one request: "
                "split them over several requests",
            ) from None
        raise HTTPException(400, f"the multipart form cannot be read: {error}") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        return [
            Upload(file.filename or f"file{i}", await file.read())
            for i, file in enumerate(files, start=1)
        ]
    finally:
        await form.close()


def invocation_images(body: bytes) -> list[Any]:
    """The `image` values of an MLflow scoring request (dataframe_split, dataframe_records or
    instances), base64 text each; 400 with the reason for anything else."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HTTPException(400, f"the body is not JSON: {error}") from None
    rows = _rows(payload)
    if not rows:
        raise HTTPException(
            400,
            'no rows: send {"dataframe_split": {"columns": ["image"], '
            '"data": [[<base64 of the image file>]]}}',
        )
    images = []
    for i, row in enumerate(rows):
        if isinstance(row, str):  # instances: ["<base64>", ...]
            row = {"image": row}
        if not isinstance(row, dict) or "image" not in row:
            keys = list(row) if isinstance(row, dict) else type(row).__name__
            raise HTTPException(
                400,
                f"row {i} has no `image` column (got {keys}): emotr serve reads images as base64 "
                "in `image`; it does not read `path`s of the server's disk",
            )
        images.append(row["image"])
    return images


def _rows(payload: Any) -> list[Any]:
    if not isinstance(payload, dict):
        raise HTTPException(400, "the body must be a JSON object in MLflow's scoring format")
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        if not isinstance(split, dict) or "columns" not in split or "data" not in split:
            raise HTTPException(400, "dataframe_split needs `columns` and `data`")
        return [dict(zip(split["columns"], values, strict=False)) for values in split["data"]]
    if "dataframe_records" in payload:
        return list(payload["dataframe_records"])
    if "instances" in payload or "inputs" in payload:
        values = payload.get("instances", payload.get("inputs"))
        return list(values) if isinstance(values, list) else [values]
    raise HTTPException(
        400,
        f"unknown scoring format (keys {sorted(payload)}): use dataframe_split, "
        "dataframe_records or instances, as for `mlflow models serve`",
    )
