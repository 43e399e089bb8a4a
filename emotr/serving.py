"""Where versions registered by the flat layout (before the subpackages) find the serving code.

Their logged code file (serving_model.py) runs `from emotr.serving import ImageScorer,
ServingSpec`; this re-export keeps those versions loading. New code imports emotr.deploy.serving.
"""

from emotr.deploy.serving import ImageScorer, ServingSpec

__all__ = ["ImageScorer", "ServingSpec"]
