"""The feature store: fingerprints, Parquet parts keyed by sha256, activations, the sets one
extraction pass fills, and maintenance (ls, verify, gc, compact, export).

May import the leaves and emotr.data (the listing index lives beside the caches). Knows nothing
of the model: the extractor's identity reaches it as the fingerprint's inputs.
"""
