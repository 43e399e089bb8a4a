"""Why a model decided and which labels look wrong: class activation maps of a registered model
(emotr explain, the grids on the challenger's run) and the label audit of the cached features
(emotr audit).

May import the leaves and every domain room below it (data, cache, extract, search, deploy);
only the CLI and the pipeline import it.
"""
