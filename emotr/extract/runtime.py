"""An extractor actor's process: the environment Keras, TensorFlow and JAX read at their first
import, the check that the configured Keras backend can run there, the Keras import itself,
TensorFlow's memory and thread settings, and the start of the backend's device runtime.

Keras fixes its backend when first imported, so these run in the actor before Keras loads;
the backends, TensorFlow and Ray are imported inside the functions that use them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from emotr.config import ExtractConfig

log = logging.getLogger(__name__)

# TensorFlow's start-up lines (oneDNN, CPU features, TensorRT and CUDA probing) fill every
# actor's log on every start; errors still get through.
_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}


def worker_environment(cfg: ExtractConfig) -> dict[str, str]:
    """What an extractor actor sets before Keras' first import: the backend, quiet start-up
    logs and, on JAX, the persistent compilation cache."""
    env = {**_QUIET_ENV, "KERAS_BACKEND": cfg.keras_backend}
    if cfg.keras_backend == "jax" and cfg.compilation_cache_dir:
        # Resolved here: a worker's working directory is not the driver's.
        env["JAX_COMPILATION_CACHE_DIR"] = str(
            Path(cfg.compilation_cache_dir).expanduser().resolve()
        )
        # Cache every compilation: the model is compiled once per actor, whatever it costs.
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def check_backend(backend: str, node: str) -> None:
    """Fail with what to do when this process cannot run Keras on `backend` ("" = any)."""
    if backend and importlib.util.find_spec(backend) is None:
        raise RuntimeError(
            f"extract.keras_backend={backend}, but {backend} is not installed on Ray node {node} "
            f"({sys.executable}); install it in every worker's environment (pip install "
            f"'emotr[jax]' for jax) or set extract.keras_backend=tensorflow"
        )


def use_environment(environment: Mapping[str, str], node: str) -> None:
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


def import_keras_without_sklearn():
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


def configure_tensorflow(n_threads: int) -> None:
    """GPU memory growth and `n_threads` intra-op threads, when Keras runs on TensorFlow."""
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


def node_cpus() -> int:
    """The CPUs Ray gives the node this process runs on (at least 1)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return max(1, int(node["Resources"].get("CPU", 1)))
    return 1
