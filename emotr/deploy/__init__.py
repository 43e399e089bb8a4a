"""A trained head as a product: model packaging, the registry, the image-in pyfunc model and its
scorer, the promotion gate's statistics, promotion and batch prediction.

May import the leaves and every domain room below it (data, cache, extract, search). Serving
(emotr.deploy.serving) imports nothing of search's training code.
"""
