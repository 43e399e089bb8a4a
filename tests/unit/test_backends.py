"""The extraction core on other Keras backends gives the TensorFlow features (where installed)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from emotr.config import BackboneConfig
from emotr.extract.backbone import FeatureExtractor

# VGG16 on another backend in a subprocess: ~10 s, so `make test` runs it, not `make test-fast`.
pytestmark = pytest.mark.slow

SCRIPT = """
import sys, numpy as np
from emotr.extract.backbone import FeatureExtractor
from emotr.config import BackboneConfig
pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
cfg = BackboneConfig(weights="hed-bsds500", input_size=(64, 64), precision="float32")
np.save(sys.argv[1], FeatureExtractor(cfg)(pixels))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backend_matches_tensorflow(backend, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install {backend} to run this check)")
    out = tmp_path / "features.npy"
    env = {**os.environ, "KERAS_BACKEND": backend}
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, check=True, timeout=300)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    expected = FeatureExtractor(
        BackboneConfig(weights="hed-bsds500", input_size=(64, 64), precision="float32")
    )(pixels)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-3, rtol=1e-5)
