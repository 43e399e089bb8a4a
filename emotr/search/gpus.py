"""Fine-tuning in the default search where the Ray cluster has GPUs (tune.finetune_on_gpus).

On CPUs an epoch of block 5 + head costs 4.5-6x a frozen head's (docs/benchmarks.md), so a search
fine-tunes there only when its config says so. Where the cluster has GPUs, `emotr run` adds
`finetune: [false, true]` to the search space, caches extract.cache_activation (block4_pool) for
those trials, and each trial that fine-tunes asks Ray for tune.gpus_per_finetune_trial GPUs; the
frozen heads stay on CPUs. What an epoch of fine-tuning cost is printed after the search.
"""

from __future__ import annotations

import pandas as pd

from emotr.config import Config, TuneConfig

FINETUNE_ACTIVATION = "block4_pool"  # block 5 and the head train on it (emotr.search.finetune)
EPOCH_SECONDS = "finetune_epoch_seconds"  # a fine-tuning trial's metric and trials.csv column


def with_gpu_finetuning(cfg: Config, cluster_gpus: float) -> Config:
    """cfg whose search may fine-tune where the cluster has GPUs and tune.finetune_on_gpus is
    on; cfg itself otherwise, and where the search space or the baseline names finetune
    already (the user's choice is kept)."""
    tune = cfg.tune
    if (
        cluster_gpus <= 0
        or not tune.finetune_on_gpus
        or "finetune" in tune.search_space
        or tune.baseline.finetune
    ):
        return cfg
    fields = cfg.model_dump()
    fields["tune"]["search_space"]["finetune"] = {"type": "categorical", "choices": [False, True]}
    fields["extract"]["cache_activation"] = cfg.extract.cache_activation or FINETUNE_ACTIVATION
    return Config.model_validate(fields)  # validated again: the activation, the choices


def trial_gpus(tune: TuneConfig, finetune: bool, cluster_gpus: float) -> float:
    """GPUs a trial asks Ray for: tune.gpus_per_finetune_trial for a fine-tuning trial on a
    cluster with GPUs, none otherwise (a frozen head is cheap on a CPU)."""
    return tune.gpus_per_finetune_trial if finetune and cluster_gpus > 0 else 0.0


def finetune_cost_line(trials: pd.DataFrame, n_images: int) -> str | None:
    """What fine-tuning cost this search (trials, seconds per joint epoch), or None when no
    trial fine-tuned. `trials`: SearchResult.trials (timed for this driver's trials);
    n_images: the images of an epoch."""
    if EPOCH_SECONDS not in trials:
        return None
    seconds = trials[EPOCH_SECONDS].dropna()
    if seconds.empty:
        return None
    return (
        f"fine-tuning block 5: {len(seconds)} trial(s), {seconds.median():.1f} s per epoch of "
        f"{n_images} images (median; {seconds.min():.1f}-{seconds.max():.1f} s)"
    )
