"""Online serving on Ray Serve: `emotr serve`'s application (a FastAPI ingress over the registered
version's ImageScorer), its requests, the alias it follows, and the files that deploy it.

May import the leaves and emotr.deploy (the registry, the scorer); nothing imports it but the CLI,
the jobs and Ray Serve itself (`import_path: emotr.serve.app:build_app`).
"""
