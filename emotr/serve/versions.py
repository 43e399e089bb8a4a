"""The registered versions a replica serves: loaded from the registry, and the alias each follows.

A replica holds one `FollowedVersion` per name it answers to (the champion, the challenger). When
the alias moves, the replica loads the new version beside the one it serves, then switches: a
request keeps the version it started with, so no request is answered by two versions or fails
while a version loads. Replicas read the alias at the same clock ticks (multiples of follow_s)
and switch at the first tick after their load ended, so that replicas of one application switch
together rather than each at its own moment.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from emotr.deploy.registry import (
    RegistryReader,
    get_version,
    load_scorer,
    version_classes,
)
from emotr.errors import EmotrError
from emotr.insight.cam import CamModel

log = logging.getLogger(__name__)

# Version tags worth showing to a client (GET /version): where the version came from.
LINEAGE_TAGS = (
    "source_trial",
    "features",
    "feature_fingerprint",
    "taps_fingerprint",
    "test_set",
    "validation_set",
    "ensemble_trials",
    "promotion.decision",
)


class ServeError(EmotrError, ValueError):
    """A model reference emotr serve cannot follow; the message says what to give instead."""


@dataclass(frozen=True)
class ModelRef:
    """A registered model and the version or alias to serve (an alias is followed)."""

    name: str
    ref: str  # "3" or "champion"

    @property
    def follows(self) -> bool:
        """True when ref is an alias, which may move."""
        return not self.ref.isdigit()

    @property
    def uri(self) -> str:
        """models:/NAME@ALIAS or models:/NAME/N."""
        return (
            f"models:/{self.name}/{self.ref}"
            if not self.follows
            else f"models:/{self.name}@{self.ref}"
        )


def parse_model_ref(model: str | None, name: str, default_alias: str) -> ModelRef:
    """--model / serve.model: a models:/ URI, a version number or an alias; None: the default."""
    if model is None:
        return ModelRef(name, default_alias)
    if model.startswith("models:/"):
        other, _, ref = model.removeprefix("models:/").replace("@", "/").partition("/")
        if not other or not ref:
            raise ServeError(f"model {model!r}: write models:/NAME@ALIAS or models:/NAME/VERSION")
        return ModelRef(other, ref)
    if ":/" in model:
        raise ServeError(
            f"model {model!r}: emotr serve serves registered versions (it follows their "
            "aliases); register it, then give models:/NAME@ALIAS, a version number or an alias"
        )
    return ModelRef(name, model)


@dataclass(frozen=True, eq=False)  # compared by identity: a batch groups its images by version
class ServedVersion:
    """One loaded version: its number, the reference it was asked by, and its scorer."""

    ref: ModelRef
    version: str
    classes: tuple[str, ...]
    run_id: str
    tags: dict[str, str]
    scorer: Any = field(repr=False)  # emotr.deploy.serving.ImageScorer
    _cam: list[CamModel] = field(default_factory=list, repr=False)  # built on first use

    def cam_model(self) -> CamModel:
        """The version's CamModel (the scorer's graphs, the head's gradient), built once;
        CamError for a version without maps (an ensemble)."""
        if not self._cam:
            self._cam.append(CamModel(self.scorer, self.scorer.extractor.batch_size))
        return self._cam[0]

    def describe(self) -> dict[str, Any]:
        """name, version, alias, classes and lineage tags: what GET /version answers."""
        return {
            "name": self.ref.name,
            "version": self.version,
            "alias": self.ref.ref if self.ref.follows else None,
            "uri": f"models:/{self.ref.name}/{self.version}",
            "classes": list(self.classes),
            "run_id": self.run_id,
            "tags": {key: self.tags[key] for key in LINEAGE_TAGS if key in self.tags},
        }

    def answer(self) -> dict[str, str | None]:
        """Who answered a request: name, version, alias."""
        return {
            "name": self.ref.name,
            "version": self.version,
            "alias": self.ref.ref if self.ref.follows else None,
        }


def resolve_version(reader: RegistryReader, ref: ModelRef) -> str:
    """The version number `ref` names now (a RegistryError when it names none)."""
    return str(get_version(reader, ref.name, ref.ref).version)


def load_served_version(
    reader: RegistryReader, ref: ModelRef, version: str, batch_size: int
) -> ServedVersion:
    """Load version `version` of ref's model; its VGG passes take up to batch_size images."""
    model_version = get_version(reader, ref.name, str(version))
    scorer = load_scorer(reader, model_version)
    # The extractor's chunk: a batch of up to max_batch_size images runs as one pass.
    scorer.extractor.batch_size = batch_size
    return ServedVersion(
        ref=ref,
        version=str(model_version.version),
        classes=version_classes(model_version),
        run_id=model_version.run_id,
        tags=dict(model_version.tags),
        scorer=scorer,
    )


def seconds_to_next_tick(now: float, period_s: float) -> float:
    """Seconds from `now` (epoch) to the next multiple of period_s: every replica's clock tick."""
    return (math.floor(now / period_s) + 1) * period_s - now


class FollowedVersion:
    """The version a reference names, loaded on first use and reloaded when its alias moves."""

    def __init__(self, reader: RegistryReader, ref: ModelRef, batch_size: int, follow_s: float):
        self.reader, self.ref = reader, ref
        self.batch_size, self.follow_s = batch_size, follow_s
        self.current: ServedVersion | None = None
        self._loading = asyncio.Lock()

    async def get(self) -> ServedVersion:
        """The version to answer with (loaded now if this is the first request for it)."""
        if self.current is None:
            async with self._loading:
                if self.current is None:
                    number = await asyncio.to_thread(resolve_version, self.reader, self.ref)
                    self.current = await asyncio.to_thread(self._load, number)
        return self.current

    def _load(self, version: str) -> ServedVersion:
        started = time.perf_counter()
        loaded = load_served_version(self.reader, self.ref, version, self.batch_size)
        log.info(
            "loaded %s version %s in %.1f s", self.ref.uri, version, time.perf_counter() - started
        )
        return loaded

    async def follow(self) -> None:
        """Forever: at each tick, read the alias; when it moved, load the version it names and
        switch to it at the first tick after the load. A failed read or load keeps the version
        served and is tried again at the next tick."""
        if not self.ref.follows:
            return
        while True:
            await asyncio.sleep(seconds_to_next_tick(time.time(), self.follow_s))
            if self.current is None:  # not asked for yet: nothing to keep current
                continue
            try:
                await self._catch_up()
            # Whatever failed (the registry unreachable, a version that does not load), the
            # loop must live on: it is the only thing that follows the alias.
            except Exception as error:
                log.warning(
                    "following %s: %s; still serving version %s",
                    self.ref.uri,
                    error,
                    self.current.version,
                )

    async def _catch_up(self) -> None:
        number = await asyncio.to_thread(resolve_version, self.reader, self.ref)
        if self.current is not None and number == self.current.version:
            return
        loaded = await asyncio.to_thread(self._load, number)
        await asyncio.sleep(seconds_to_next_tick(time.time(), self.follow_s))
        previous, self.current = self.current, loaded
        log.info(
            "%s moved: serving version %s (was %s)",
            self.ref.uri,
            loaded.version,
            previous.version if previous else None,
        )
