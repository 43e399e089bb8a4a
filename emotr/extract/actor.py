"""The extractor actor: a Ray Data callable class that loads the model once per actor and
turns decoded pixels into features, and the columns and wire dtypes of what it hands back.

Ray is imported in the constructor, since the driver of a warm `emotr extract` loads this module
and starts no Ray; Keras loads in the background (emotr.extract.runtime), once the actor has set
the environment that Keras reads at its first import.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from emotr.extract.runtime import (
    check_backend,
    configure_tensorflow,
    import_keras_without_sklearn,
    initialise_devices,
    node_cpus,
    use_environment,
)
from emotr.taps import ACTIVATIONS, DEFAULT_TAP, parse_view_output

log = logging.getLogger(__name__)

ModelLoader = Callable[[], Callable[[np.ndarray], np.ndarray]]


class Extractor:
    """Ray Data callable class: loads the model once, turns decoded pixels into features.

    `outputs` (name -> shape per image) names what the model gives: a model with
    `extract_outputs` (emotr.extract.backbone.FeatureExtractor) gives each by name, any other
    callable gives gap5's features. gap5 comes out as the `features` column, any other output
    as `out_<name>`; activations travel as bfloat16 bits (uint16), half the bytes of float32.
    View outputs (`gap5_view3`) are made here, in the actor, from the decoded pixels and the
    batch's sha256 column (see emotr.data.augment for why not in the decode task).
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
        check_backend(backend, node)  # before Keras is imported: that would fail less clearly
        use_environment(environment or {}, node)
        self.outputs = outputs or {DEFAULT_TAP: (dim,)}
        self.views = any(parse_view_output(name) for name in self.outputs)
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
            keras = import_keras_without_sklearn()
            configure_tensorflow(n_threads or node_cpus())
            phase("keras import")
            devices = initialise_devices(keras.backend.backend())
            phase("device runtime start")
            self.model = load_model()
            phase("model build")
            if warm_up:
                # Compile now, once: two first calls at the same time would both compile.
                # (Without them the first batch compiles, and a warm-up would cost one batch.)
                self._run(np.zeros((1, *input_shape), np.uint8), np.array(["0" * 64]))
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
            values = self._run(np.asarray(batch["pixels"], np.uint8), batch["sha256"])
        else:
            pixels, keys = np.asarray(batch["pixels"][ok], np.uint8), batch["sha256"][ok]
            good = self._run(pixels, keys) if ok.any() else {}
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

    def _run(self, pixels: np.ndarray, sha256s: np.ndarray) -> dict[str, np.ndarray]:
        if hasattr(self.model, "extract_outputs") and self.views:
            values = self.model.extract_outputs(pixels, sha256s=[str(key) for key in sha256s])
        elif hasattr(self.model, "extract_outputs"):
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
