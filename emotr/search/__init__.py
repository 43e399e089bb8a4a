"""Heads trained on cached features: the training set, the head, fine-tuning of block 5, one
trial, the Optuna study, the search driver, its report and plots.

May import the leaves, emotr.data, emotr.cache and emotr.extract (fine-tuning rebuilds block 5).
The only room that imports Optuna; MLflow only through emotr.track.
"""
