"""The Ray Data dataset from (path, sha256) rows to features: how many extractor actors with
what resources (ActorPlan), the input blocks, the read-hash-decode tasks, the actor pool, and
the stream of its output batches with progress shown. Extraction's driver and batch prediction
(emotr.deploy.predict) both run it.

With GPUs, decoding runs in CPU tasks across the cluster and only uint8 pixels travel to the GPU
actors. Without GPUs the two stages ask for the same resources and Ray Data fuses them into the
actor: pixels never leave the process (measured no slower than separate decode tasks on 2 cores).

Ray is imported inside the functions: the driver of a warm `emotr extract`, which starts no Ray,
loads this module. Nothing here calls ray.init: the CLI or the test does.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emotr.config import Config, ExtractConfig
from emotr.data.imageio import decode_batch
from emotr.extract.actor import Extractor, ModelLoader
from emotr.extract.runtime import worker_environment
from emotr.extract.weights import feature_dim

log = logging.getLogger(__name__)

# More decode blocks than this only adds scheduling overhead; each block is decoded in batches.
_MAX_DECODE_BLOCKS = 2000
# Long enough for an autoscaler to add a GPU node; a pool that cannot be placed fails after it.
_ACTOR_START_TIMEOUT_S = 900
# Without a terminal, one progress line at least this often, and at every tenth of the images.
_PROGRESS_EVERY_S = 30.0
_PROGRESS_STEPS = 10


@dataclass(frozen=True)
class ActorPlan:
    """The extractor actors of one job: how many, and what each asks Ray for."""

    n_actors: int
    resources: dict  # num_cpus and num_gpus for map_batches
    n_threads: int  # TensorFlow intra-op threads; 0 = the CPUs of the actor's node

    @property
    def on_gpus(self) -> bool:
        """Whether each actor holds a GPU."""
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

    decode_compute = ray.data.TaskPoolStrategy(size=cfg.extract.decode_concurrency or None)
    decode_args = {
        "size": tuple(cfg.backbone.input_size),
        "max_pixels": cfg.decode.max_pixels,
        "background": tuple(cfg.decode.background),
        "skip": skip,
        "resize": cfg.decode.resize,
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
                "environment": worker_environment(cfg.extract),
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


class _ProgressLog:
    """One short log line every `every_s` seconds or every 1/`n_steps` of the images."""

    def __init__(
        self,
        total: int,
        every_s: float = _PROGRESS_EVERY_S,
        n_steps: int = _PROGRESS_STEPS,
        label: str = "extract",
        n_passes: int = 1,
    ):
        self.total, self.every_s, self.n_steps, self.label = total, every_s, n_steps, label
        self.n_passes = n_passes
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
        rate = n_done / elapsed if elapsed > 0 else 0.0
        # Views and _flip taps run the conv base again per image: images/s alone would hide it.
        passes = f" ({self.n_passes} passes each, {rate * self.n_passes:.1f}/s)"
        log.info(
            "%s: %d/%d images (%d%%), %d failed, %.1f images/s%s",
            self.label,
            n_done,
            self.total,
            100 * n_done // self.total,
            n_failed,
            rate,
            passes if self.n_passes > 1 else "",
        )
        self.last = now
        self.next_step = n_done * self.n_steps // self.total + 1


class _RayProgressNotice(logging.Filter):
    """Drops Ray Data's "Progress bars disabled" notice: emotr turns them off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def stream_batches(
    dataset, n_rows: int, progress: bool, label: str = "extract", n_passes: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """The output batches of a `build_dataset` dataset, with progress shown as extraction does.

    In a terminal Ray Data draws its live progress bars; otherwise (a log file, CI, a pipe)
    its bars are off and a short `label:` line is logged every 30 s or 10 % of `n_rows`, with
    the passes of the conv base per image when there are several (`n_passes`).
    """
    live = progress and sys.stdout.isatty()
    dataset.context.enable_progress_bars = live
    # Rich, like the CLI's own display (Ray Data's tqdm bars print a notice that asks for it).
    dataset.context.enable_rich_progress_bars, dataset.context.use_ray_tqdm = live, False
    lines = _ProgressLog(n_rows, label=label, n_passes=n_passes) if progress and not live else None
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
