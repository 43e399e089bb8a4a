"""Images to features: weight sources, the VGG backbone, the worker runtime, the extractor
actors, the Ray Data dataset and the driver that commits to the cache.

May import the leaves, emotr.data and emotr.cache. TensorFlow/Keras and Ray are imported inside
the functions that use them, so planning a warm run loads neither.
"""
