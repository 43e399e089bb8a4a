"""The Ray Data pipeline: images not cached yet -> read, hash, decode -> VGG16 features
(actors, one model each) -> the driver commits them to the Parquet cache.

Files the listing index does not know are hashed by the task that reads them (the driver never
reads an image): one whose bytes turn out to be cached (a renamed file) is not decoded, and the
driver completes the Listing from the hashes the tasks hand back (emotr.data.index.Scan).

With GPUs, decoding runs in CPU tasks across the cluster and only uint8 pixels travel to the GPU
actors. Without GPUs the two stages ask for the same resources and Ray Data fuses them into the
actor: pixels never leave the process (measured no slower than separate decode tasks on 2 cores).

The driver is the cache's only writer: Ray may run a task twice (retries, restarted actors), but
rows are keyed by content hash and the driver skips hashes it has committed, so the cache never
holds a row twice. A killed driver loses at most the rows it had not committed; the next run
extracts only what is missing. This module never calls ray.init: the CLI or the test does.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from emotr.cache.sets import CacheSet, open_cache_set
from emotr.config import Config, ExtractConfig
from emotr.data.imageio import decode_batch, hash_keys
from emotr.data.index import Scan
from emotr.data.listing import Listing
from emotr.errors import EmotrError
from emotr.taps import ACTIVATIONS, DEFAULT_TAP

log = logging.getLogger(__name__)

FAILURE_COLUMNS = ["path", "sha256", "reason"]
# More decode blocks than this only adds scheduling overhead; each block is decoded in batches.
_MAX_DECODE_BLOCKS = 2000
# Long enough for an autoscaler to add a GPU node; a pool that cannot be placed fails after it.
_ACTOR_START_TIMEOUT_S = 900
# Without a terminal, one progress line at least this often, and at every tenth of the images.
_PROGRESS_EVERY_S = 30.0
_PROGRESS_STEPS = 10
# TensorFlow's start-up lines (oneDNN, CPU features, TensorRT and CUDA probing) fill every
# actor's log on every start; errors still get through.
_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}

ModelLoader = Callable[[], Callable[[np.ndarray], np.ndarray]]


@dataclass
class ExtractSummary:
    fingerprint: str
    n_images: int
    n_unique: int
    n_cached: int
    n_extracted: int
    n_failed: int
    failures: pd.DataFrame  # path, sha256, reason
    wall_seconds: float
    images_per_second: float
    rows_per_worker: dict[str, int] = field(default_factory=dict)
    n_actors: int = 0  # extractor actors started (0 when everything was cached)
    # Until the first features reached the driver: actor start, TF import, model load, tracing.
    startup_seconds: float = 0.0
    # The completed listing: every hash known, including those the workers learned.
    listing: Listing | None = None


class TooManyFailures(EmotrError, RuntimeError):
    """More undecodable images than extract.max_failure_fraction allows (good ones are cached)."""

    def __init__(self, summary: ExtractSummary, max_fraction: float):
        self.summary = summary
        examples = "; ".join(
            f"{row.path}: {row.reason}" for row in summary.failures.head(3).itertuples()
        )
        super().__init__(
            f"{summary.n_failed} of {summary.n_unique} images could not be decoded "
            f"({summary.n_failed / max(summary.n_unique, 1):.1%}), more than "
            f"extract.max_failure_fraction={max_fraction}; the {summary.n_extracted} good ones "
            f"are cached. Fix or remove the bad files, or raise extract.max_failure_fraction. "
            f"First failures: {examples}"
        )


def _check_backend(backend: str, node: str) -> None:
    """Fail with what to do when this process cannot run Keras on `backend` ("" = any)."""
    if backend and importlib.util.find_spec(backend) is None:
        raise RuntimeError(
            f"extract.keras_backend={backend}, but {backend} is not installed on Ray node {node} "
            f"({sys.executable}); install it in every worker's environment (pip install "
            f"'emotr[jax]' for jax) or set extract.keras_backend=tensorflow"
        )


def _use_environment(environment: Mapping[str, str], node: str) -> None:
    """Set what Keras, TensorFlow and JAX read when first imported, in this actor's process.

    Set here rather than as a Ray runtime_env: an actor without one takes a worker Ray already
    started (a second or more sooner); the process is the actor's alone and ends with it.
    """
    wanted = environment.get("KERAS_BACKEND")
    keras = sys.modules.get("keras")
    if keras is not None and wanted and keras.backend.backend() != wanted:
        raise RuntimeError(
            f"Ray worker {node}:{os.getpid()} already runs Keras on {keras.backend.backend()}, "
            f"not extract.keras_backend={wanted}: run extraction before anything that imports "
            "Keras in plain Ray tasks of the same job"
        )
    os.environ.update(environment)


def _import_keras_without_sklearn():
    """Keras, imported without scikit-learn where this process has not loaded it yet.

    Keras imports scikit-learn for its sklearn wrappers whenever it is installed: 0.75 s of a
    4.3 s import on 2 CPUs, paid by every actor start, for wrappers the extractor never uses.
    A None entry in sys.modules makes that optional import fail; it is removed at once, so a
    later `import sklearn` in this process works as usual.
    """
    blocked = "sklearn" not in sys.modules
    if blocked:
        sys.modules["sklearn"] = None  # type: ignore[assignment]
    try:
        import keras
    finally:
        if blocked:
            del sys.modules["sklearn"]
    return keras


def initialise_devices(backend: str) -> list[str]:
    """Start the Keras backend's device runtime now (CUDA on a GPU node); the devices it sees.

    Called once Keras is imported and configured, so that the start-up timeline shows the
    runtime's start (CUDA initialisation, device discovery) apart from the weights' load and
    the first compile, where it would otherwise happen unseen.
    """
    if backend == "jax":
        import jax

        return [str(device) for device in jax.devices()]
    if backend == "tensorflow":
        import tensorflow as tf

        return [device.name for device in tf.config.list_logical_devices()]
    import torch

    return ["cpu", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]


def _configure_tensorflow(n_threads: int) -> None:
    import keras

    if keras.backend.backend() != "tensorflow":  # jax and torch size their pools themselves
        return
    import tensorflow as tf

    try:
        # Without memory growth TF takes all GPU memory, whatever Ray reserved on paper.
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        if n_threads:
            tf.config.threading.set_intra_op_parallelism_threads(n_threads)
    except RuntimeError:
        log.warning("TensorFlow was initialised before the extractor could configure it")


class Extractor:
    """Ray Data callable class: loads the model once, turns decoded pixels into features.

    `outputs` (name -> shape per image) names what the model gives: a model with
    `extract_outputs` (emotr.extract.backbone.FeatureExtractor) gives each by name, any other callable
    gives gap5's features. gap5 comes out as the `features` column, any other output as
    `out_<name>`; activations travel as bfloat16 bits (uint16), half the bytes of float32.
    """

    def __init__(
        self,
        load_model: ModelLoader,
        input_shape: tuple[int, int, int],
        dim: int = 0,
        n_threads: int = 0,
        backend: str = "",
        environment: Mapping[str, str] | None = None,
        concurrent_calls: bool = False,
        outputs: dict[str, tuple[int, ...]] | None = None,
    ):
        import ray

        node = ray.get_runtime_context().get_node_id()[:12]
        _check_backend(backend, node)  # before Keras is imported: that would fail less clearly
        _use_environment(environment or {}, node)
        self.outputs = outputs or {DEFAULT_TAP: (dim,)}
        self.worker = f"{node}:{os.getpid()}"
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.load_phases: dict[str, float] = {}  # seconds of each step of the model's load
        # The model loads (Keras import, weights, first compile) in the background: Ray Data
        # already hands this actor batches, whose decoding overlaps the load instead of
        # following it. Calls wait for the model.
        threading.Thread(
            target=self._load,
            args=(load_model, input_shape, n_threads, concurrent_calls),
            name="emotr-model-load",
            daemon=True,
        ).start()

    def _load(
        self,
        load_model: ModelLoader,
        input_shape: tuple[int, int, int],
        n_threads: int,
        warm_up: bool,
    ) -> None:
        clock = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal clock
            self.load_phases[name] = time.perf_counter() - clock
            clock = time.perf_counter()

        try:
            keras = _import_keras_without_sklearn()
            _configure_tensorflow(n_threads or _node_cpus())
            phase("keras import")
            devices = initialise_devices(keras.backend.backend())
            phase("device runtime start")
            self.model = load_model()
            phase("model build")
            if warm_up:
                # Compile now, once: two first calls at the same time would both compile.
                # (Without them the first batch compiles, and a warm-up would cost one batch.)
                self._run(np.zeros((1, *input_shape), np.uint8))
                phase("first compile")
            self.worker += f":{keras.backend.backend()}"
            log.info(
                "extractor %s ready on %s: %s",
                self.worker,
                ", ".join(devices),
                ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.load_phases.items()),
            )
        except BaseException as error:  # raised by every call: the actor cannot extract
            self._load_error = error
        finally:
            self._ready.set()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        ok = batch["ok"].astype(bool)
        if ok.all():  # no copy of the pixels (77 MB for 128 images at 400x500)
            values = self._run(np.asarray(batch["pixels"], np.uint8))
        else:
            good = self._run(np.asarray(batch["pixels"][ok], np.uint8)) if ok.any() else {}
            values = {}
            for name, shape in self.outputs.items():
                # Shaped like the model's output where there is one (a model may give more
                # than the declared gap5 width, e.g. a deployed model's chosen taps).
                shape = good[name].shape[1:] if name in good else shape
                values[name] = np.zeros((len(ok), *shape), _wire_dtype(name))
                if name in good:
                    values[name][ok] = good[name]
        return {
            "path": batch["path"],
            "sha256": batch["sha256"],
            **{output_column(name): value for name, value in values.items()},
            "ok": ok,
            "cached": batch["cached"],
            "reason": batch["reason"],
            "height": batch["height"],
            "width": batch["width"],
            "worker": np.full(len(ok), self.worker, dtype=object),
        }

    def _run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        if hasattr(self.model, "extract_outputs"):
            values = self.model.extract_outputs(pixels)
        elif set(self.outputs) == {DEFAULT_TAP}:
            values = {DEFAULT_TAP: self.model(pixels)}
        else:
            raise ValueError(
                f"the extractor model has no extract_outputs, so it gives {DEFAULT_TAP} alone; "
                f"{sorted(self.outputs)} were asked for"
            )
        return {name: _to_wire(name, values[name]) for name in self.outputs}


def output_column(name: str) -> str:
    """The Ray Data column of an extractor output: `features` for gap5, else `out_<name>`."""
    return "features" if name == DEFAULT_TAP else f"out_{name}"


def _wire_dtype(name: str) -> type:
    return np.uint16 if name in ACTIVATIONS else np.float32


def _to_wire(name: str, value: np.ndarray) -> np.ndarray:
    if name not in ACTIVATIONS:
        return np.asarray(value, np.float32)
    import ml_dtypes

    return np.asarray(value).astype(ml_dtypes.bfloat16).view(np.uint16)


def _node_cpus() -> int:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return max(1, int(node["Resources"].get("CPU", 1)))
    return 1


@dataclass(frozen=True)
class ActorPlan:
    n_actors: int
    resources: dict  # num_cpus and num_gpus for map_batches
    n_threads: int  # TensorFlow intra-op threads; 0 = the CPUs of the actor's node

    @property
    def on_gpus(self) -> bool:
        return self.resources.get("num_gpus", 0) > 0


def plan_actors(cfg: ExtractConfig) -> ActorPlan:
    """How many extractor actors, with what resources, for the connected cluster."""
    import ray

    total = ray.cluster_resources()
    n_gpus, n_cpus = int(total.get("GPU", 0)), total.get("CPU", 0)
    if n_gpus:
        if cfg.n_actors > n_gpus:
            raise ValueError(
                f"extract.n_actors={cfg.n_actors} but the cluster has {n_gpus} GPUs; "
                f"use at most {n_gpus} (or 0 for one actor per GPU)"
            )
        resources = {"num_gpus": 1, "num_cpus": cfg.cpus_per_actor}
        return ActorPlan(cfg.n_actors or n_gpus, resources, n_threads=0)
    if cfg.n_actors:
        plan = ActorPlan(
            cfg.n_actors, {"num_cpus": cfg.cpus_per_actor}, math.ceil(cfg.cpus_per_actor)
        )
    else:
        # One actor per node (Ray Data spreads actors over nodes), its TF thread pool as wide as
        # the node: VGG16 on oneDNN scales across cores inside one process, and every extra actor
        # costs a model copy in memory. Decode tasks share those cores; they are the cheap part.
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        plan = ActorPlan(max(1, len(nodes)), {"num_cpus": cfg.cpus_per_actor}, n_threads=0)
    # Decoding fuses into the actors when both ask for one CPU (and the same concurrency);
    # otherwise decode tasks need a CPU of their own, or the job would wait forever.
    fused = cfg.cpus_per_actor == 1 and cfg.decode_concurrency in (0, plan.n_actors)
    if plan.n_actors * cfg.cpus_per_actor > n_cpus - (0 if fused else 1):
        raise ValueError(
            f"{plan.n_actors} extractor actors x extract.cpus_per_actor={cfg.cpus_per_actor} "
            f"do not fit, with decoding, in a cluster of {n_cpus:g} CPUs; lower "
            f"extract.n_actors or extract.cpus_per_actor"
        )
    return plan


def build_dataset(
    cfg: Config,
    todo: pd.DataFrame,
    load_model: ModelLoader,
    plan: ActorPlan,
    skip: np.ndarray | None = None,
    outputs: dict[str, tuple[int, ...]] | None = None,
):
    """The lazy Ray Dataset from (path, sha256) rows to features.

    A row with an empty sha256 is hashed where it is read; `skip` (imageio.hash_keys) names
    the hashes not to decode (already cached). `outputs`: what the model gives, by name and
    shape per image (see Extractor); default gap5's features.
    """
    import ray

    from emotr.extract.backbone import feature_dim

    decode_compute = ray.data.TaskPoolStrategy(size=cfg.extract.decode_concurrency or None)
    decode_args = {
        "size": tuple(cfg.backbone.input_size),
        "max_pixels": cfg.decode.max_pixels,
        "background": tuple(cfg.decode.background),
        "skip": skip,
    }
    blocks = _split_rows(todo[["path", "sha256"]], _rows_per_block(cfg.extract, len(todo)))
    return (
        ray.data.from_pandas(blocks)
        .map_batches(
            decode_batch,
            fn_kwargs=decode_args,
            batch_size=cfg.extract.decode_batch_size,
            batch_format="numpy",
            compute=decode_compute,
            udf_modifying_row_count=False,
        )
        .map_batches(
            Extractor,
            fn_constructor_kwargs={
                "load_model": load_model,
                "input_shape": (*cfg.backbone.input_size, 3),
                "dim": feature_dim(cfg.backbone),
                "outputs": outputs,
                "n_threads": plan.n_threads,
                "backend": cfg.extract.keras_backend,
                "environment": {**_QUIET_ENV, **_backend_env_vars(cfg.extract)},
                "concurrent_calls": plan.on_gpus,
            },
            batch_size=cfg.extract.batch_size,
            batch_format="numpy",
            # Two calls per actor: one decodes (fused on CPU) or unpacks its batch while the
            # other runs the model. On GPUs both may run the model: one batch is copied to the
            # GPU while the other computes. On CPUs the model runs one call at a time, since
            # it already keeps every core busy.
            compute=ray.data.ActorPoolStrategy(
                size=plan.n_actors,
                max_concurrent_calls_per_actor=2,
                enable_true_multi_threading=plan.on_gpus,
            ),
            udf_modifying_row_count=False,
            **plan.resources,
        )
    )


def _backend_env_vars(cfg: ExtractConfig) -> dict[str, str]:
    env = {"KERAS_BACKEND": cfg.keras_backend}
    if cfg.keras_backend == "jax" and cfg.compilation_cache_dir:
        # Resolved here: a worker's working directory is not the driver's.
        env["JAX_COMPILATION_CACHE_DIR"] = str(
            Path(cfg.compilation_cache_dir).expanduser().resolve()
        )
        # Cache every compilation: the model is compiled once per actor, whatever it costs.
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _rows_per_block(cfg: ExtractConfig, n_rows: int) -> int:
    """Rows of each input block: whole forward passes (a multiple of extract.batch_size).

    A block is one decode task; the actor runs its rows in passes of batch_size and pads a
    short last pass to batch_size (every new shape recompiles). Blocks of 15 rows made 163
    images cost 7 passes instead of 6.
    """
    passes = max(math.ceil(cfg.decode_batch_size / cfg.batch_size), 1)
    passes = max(passes, math.ceil(n_rows / (_MAX_DECODE_BLOCKS * cfg.batch_size)))
    return passes * cfg.batch_size


def _split_rows(frame: pd.DataFrame, step: int) -> list[pd.DataFrame]:
    # One block per frame; from_pandas(override_num_blocks=) fails on pandas 3 in Ray 2.60.
    return [frame.iloc[start : start + step] for start in range(0, len(frame), step)]


class _Committer:
    """Collects the actors' output on the driver and commits every `every` good rows."""

    def __init__(self, cache: CacheSet, every: int, outputs: tuple[str, ...] = (DEFAULT_TAP,)):
        self.cache, self.every, self.outputs = cache, every, tuple(outputs)
        self.pending: list[dict[str, np.ndarray]] = []
        self.n_pending = self.n_committed = 0
        self.failures: list[tuple[str, str, str]] = []
        self.learned: dict[str, str] = {}  # path -> sha256 of every file read, good or bad
        self.workers: Counter[str] = Counter()
        self.n_seen = 0  # rows handed over, good or failed (a retried row may come twice)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        ok = batch["ok"].astype(bool)
        failed = ~ok & ~batch["cached"].astype(bool)
        self.n_seen += len(ok)
        self.workers.update(str(worker) for worker in batch["worker"])
        self.learned.update(
            (str(path), str(key)) for path, key in zip(batch["path"], batch["sha256"], strict=True)
        )
        self.failures += zip(
            batch["path"][failed], batch["sha256"][failed], batch["reason"][failed], strict=True
        )
        columns = ["sha256", "height", "width", *map(output_column, self.outputs)]
        good = {key: batch[key][ok] for key in columns}
        self.pending.append(good)
        self.n_pending += int(ok.sum())
        while self.n_pending >= self.every:
            self.flush(self.every)

    def flush(self, n_rows: int | None = None) -> None:
        if not self.n_pending:
            return
        rows = {key: np.concatenate([p[key] for p in self.pending]) for key in self.pending[0]}
        n_rows = n_rows or len(rows["sha256"])
        self.n_committed += self.cache.commit(
            [str(key) for key in rows["sha256"][:n_rows]],
            {name: rows[output_column(name)][:n_rows] for name in self.outputs},
            rows["height"][:n_rows].tolist(),
            rows["width"][:n_rows].tolist(),
        )
        self.pending = [{key: value[n_rows:] for key, value in rows.items()}]
        self.n_pending -= n_rows


class _ProgressLog:
    """One short log line every `every_s` seconds or every 1/`n_steps` of the images."""

    def __init__(
        self,
        total: int,
        every_s: float = _PROGRESS_EVERY_S,
        n_steps: int = _PROGRESS_STEPS,
        label: str = "extract",
    ):
        self.total, self.every_s, self.n_steps, self.label = total, every_s, n_steps, label
        self.start = self.last = time.monotonic()
        self.next_step = 1

    def update(self, n_done: int, n_failed: int) -> None:
        """Log a line when a tenth more of the images is done or `every_s` have passed."""
        n_done = min(n_done, self.total)
        now = time.monotonic()
        # Integer arithmetic: 3 of 10 images is exactly the third step.
        if n_done * self.n_steps < self.next_step * self.total and now - self.last < self.every_s:
            return
        elapsed = now - self.start
        log.info(
            "%s: %d/%d images (%d%%), %d failed, %.1f images/s",
            self.label,
            n_done,
            self.total,
            100 * n_done // self.total,
            n_failed,
            n_done / elapsed if elapsed > 0 else 0.0,
        )
        self.last = now
        self.next_step = n_done * self.n_steps // self.total + 1


class _RayProgressNotice(logging.Filter):
    """Drops Ray Data's "Progress bars disabled" notice: emotr turns them off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def stream_batches(
    dataset, n_rows: int, progress: bool, label: str = "extract"
) -> Iterator[dict[str, np.ndarray]]:
    """The output batches of a `build_dataset` dataset, with progress shown as extraction does.

    In a terminal Ray Data draws its live progress bars; otherwise (a log file, CI, a pipe)
    its bars are off and a short `label:` line is logged every 30 s or 10 % of `n_rows`.
    """
    live = progress and sys.stdout.isatty()
    dataset.context.enable_progress_bars = live
    # Rich, like the CLI's own display (Ray Data's tqdm bars print a notice that asks for it).
    dataset.context.enable_rich_progress_bars, dataset.context.use_ray_tqdm = live, False
    lines = _ProgressLog(n_rows, label=label) if progress and not live else None
    # Start every actor before dispatching: work is shared by all of them, and a pool the
    # cluster cannot place fails with a timeout instead of hanging.
    dataset.context.wait_for_min_actors_s = _ACTOR_START_TIMEOUT_S
    ray_progress_log = logging.getLogger("ray.data._internal.progress")
    notice = _RayProgressNotice()
    ray_progress_log.addFilter(notice)
    n_done = n_failed = 0
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            n_done += len(batch["ok"])
            n_failed += int((~batch["ok"].astype(bool) & ~batch["cached"].astype(bool)).sum())
            if lines:
                lines.update(n_done, n_failed)
            yield batch
    finally:
        ray_progress_log.removeFilter(notice)


def _consume(dataset, committer: _Committer, n_todo: int, progress: bool) -> float | None:
    """Commit the dataset's output; returns when (perf_counter) the first rows arrived."""
    first_rows_at = None
    batches = stream_batches(dataset, n_todo, progress)
    try:
        for batch in batches:
            first_rows_at = first_rows_at or time.perf_counter()
            committer.add(batch)
    finally:  # keep what was extracted, even when the job fails half-way
        batches.close()
        committer.flush()
    return first_rows_at


def plan_extraction(
    cfg: Config, listing: Listing | Scan
) -> tuple[CacheSet, pa.Array, pd.DataFrame]:
    """The caches, the hashes all of them hold, and what to extract: path, sha256 ("" = read
    to know). Each configured tap and the activation has its cache; an image one of them lacks
    is extracted (once, for all it lacks).

    Nothing to extract (an empty frame) means a run would start neither Ray nor a model.
    """
    cache = open_cache_set(cfg)
    cached = cache.complete_hashes()
    known = listing.images[["path", "sha256"]] if isinstance(listing, Listing) else listing.known()
    unique = known.drop_duplicates("sha256")
    unknown = listing.unknown() if isinstance(listing, Scan) else known.iloc[:0, :1]
    # Arrow's is_in on the cache's Arrow column: half the time of a Python set and pandas isin.
    hashes = pa.array(unique["sha256"].to_numpy(), pa.string())
    held = pc.is_in(hashes, value_set=cached).to_numpy(zero_copy_only=False)
    todo = pd.concat([unique[~held], unknown.assign(sha256="")], ignore_index=True)
    return cache, cached, todo


def extract_features(
    cfg: Config,
    listing: Listing | Scan,
    *,
    progress: bool = True,
    load_model: ModelLoader | None = None,
    connect: Callable[[], None] | None = None,
    planned: tuple[CacheSet, pa.Array, pd.DataFrame] | None = None,
) -> ExtractSummary:
    """Extract and cache features of the listing's images that the cache does not hold yet.

    A Scan's files of unknown hash are read and hashed by the pipeline's tasks; the completed
    Listing is `summary.listing`. `load_model` (default: the configured FeatureExtractor) lets
    tests and benchmarks swap the model; it must produce the features the fingerprint
    describes. `connect` is called before the first use of Ray, only when there is work.
    `progress` shows Ray Data's live bars in a terminal and logs a line every 30 s or 10 %
    elsewhere. `planned` is plan_extraction(cfg, listing) when the caller has it already.
    """
    start = time.perf_counter()
    # The plan lists every cache part and compares 100k hashes: ~0.15 s a warm run pays once.
    cache, cached_before, todo = planned or plan_extraction(cfg, listing)
    fingerprint = cache.fingerprint
    unknown = todo[todo["sha256"] == ""]
    outputs = cache.missing_outputs(set(todo["sha256"]) - {""}, unknown=len(unknown) > 0)
    committer = _Committer(cache, cfg.extract.commit_every, tuple(outputs))
    plan, startup = None, 0.0
    if len(todo):
        if connect is not None:
            connect()
        if load_model is None:
            from emotr.extract.backbone import FeatureExtractor, check_weights

            check_weights(cfg.backbone)
            load_model = functools.partial(
                FeatureExtractor, cfg.backbone, batch_size=cfg.extract.batch_size, outputs=outputs
            )
        plan = plan_actors(cfg.extract)
        log.info(
            "extracting %s of %d images with %d actors into %s",
            "+".join(outputs),
            len(todo),
            plan.n_actors,
            fingerprint,
        )
        # Only files of unknown hash may turn out cached (renamed or copied ones).
        skip = hash_keys(cached_before.to_pylist()) if len(unknown) else None
        first_rows_at = _consume(
            build_dataset(cfg, todo, load_model, plan, skip, _shapes(cfg, outputs)),
            committer,
            len(todo),
            progress,
        )
        # Until the first features reached the driver: actor start, imports, model load, tracing.
        startup = first_rows_at - start if first_rows_at else 0.0
    if isinstance(listing, Scan):
        listing = listing.complete(committer.learned)
    summary = _summarize(
        listing, cached_before, committer, fingerprint, time.perf_counter() - start
    )
    summary.n_actors, summary.startup_seconds = (plan.n_actors if plan else 0), startup
    if summary.n_failed > cfg.extract.max_failure_fraction * summary.n_unique:
        raise TooManyFailures(summary, cfg.extract.max_failure_fraction)
    if summary.n_failed:
        first = summary.failures.iloc[0]
        log.warning(
            "%d of %d images could not be decoded and are left out; first: %s: %s",
            summary.n_failed,
            summary.n_unique,
            first["path"],
            first["reason"],
        )
    return summary


def _shapes(cfg: Config, outputs: list[str]) -> dict[str, tuple[int, ...]]:
    from emotr.extract.backbone import output_shape

    return {name: output_shape(cfg.backbone, name) for name in outputs}


def _summarize(
    listing: Listing,
    cached_before: pa.Array,
    committer: _Committer,
    fingerprint: str,
    wall: float,
) -> ExtractSummary:
    # A retried task may hand the same failure over twice; an image fails once. A file that
    # could not be read has no hash: its path names it.
    failures = pd.DataFrame(committer.failures, columns=FAILURE_COLUMNS)
    failures = failures.assign(
        key=failures["sha256"].where(failures["sha256"] != "", failures["path"])
    )
    failures = failures.drop_duplicates("key").drop(columns="key").reset_index(drop=True)
    unique = pa.array(listing.images["sha256"].to_numpy(), pa.string()).unique()
    n_unreadable = int((failures["sha256"] == "").sum())
    return ExtractSummary(
        fingerprint=fingerprint,
        n_images=len(listing.images),
        n_unique=len(unique) + n_unreadable,
        n_cached=pc.sum(pc.is_in(unique, value_set=cached_before)).as_py() or 0,
        n_extracted=committer.n_committed,
        n_failed=len(failures),
        failures=failures,
        wall_seconds=wall,
        images_per_second=committer.n_committed / wall if wall > 0 else 0.0,
        rows_per_worker=dict(committer.workers),
        listing=listing,
    )
