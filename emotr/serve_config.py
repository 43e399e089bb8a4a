"""The `serve` section of the config (`emotr serve` on Ray Serve): a leaf beside emotr.config,
which composes it into Config and re-exports it. Imports nothing of emotr's but hyperparams'
StrictModel."""

from __future__ import annotations

from pydantic import Field, model_validator

from emotr.hyperparams import StrictModel


class AutoscalingConfig(StrictModel):
    # Ray Serve's autoscaling: replicas between these, aiming at this many requests in flight
    # per replica (a replica batches up to serve.max_batch_size of them).
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _range(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serve.autoscaling.min_replicas {self.min_replicas} is above max_replicas "
                f"{self.max_replicas}: raise max_replicas or lower min_replicas"
            )
        return self


class ServeConfig(StrictModel):
    # Where `emotr serve` listens: 127.0.0.1 answers this machine only; 0.0.0.0 every network.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # The version served: a models:/ URI, a version number or an alias; null = the champion
    # (registry.champion_alias). An alias is followed: when it moves, replicas load the new
    # version and switch to it (see follow_s).
    model: str | None = None
    # The version `?model=challenger` (the page's comparison) answers with; null = none.
    challenger: str | None = "challenger"
    app_name: str = "emotr"  # the Ray Serve application's name (`serve status` lists it)
    # Where its endpoints start: several applications can share Serve's one HTTP port.
    route_prefix: str = Field("/", pattern=r"^/")
    replicas: int = Field(1, ge=1)  # fixed replica count, unless autoscaling is set
    autoscaling: AutoscalingConfig | None = None
    cpus_per_replica: float = Field(1.0, gt=0)  # also its TensorFlow threads (at least 1)
    gpus_per_replica: float = Field(0.0, ge=0)
    # Concurrent requests share VGG passes: when a pass ends, the next takes every image waiting,
    # up to max_batch_size, and waits at most batch_wait_s for more; a lone request runs alone at
    # once, never padded.
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_s: float = Field(0.01, ge=0, le=10)
    max_ongoing_requests: int = Field(32, ge=1)  # per replica; more wait in Serve's queue
    max_queued_requests: int = Field(1000, ge=1)  # beyond these Serve answers 503
    max_upload_mb: float = Field(20.0, gt=0)  # one request's body; above it 413
    max_files: int = Field(64, ge=1)  # images in one request; above it 413
    request_timeout_s: float = Field(60.0, gt=0)  # then 504 with the reason
    # How often each replica reads the alias it follows. Replicas read it at the same clock
    # ticks, load a new version beside the old one, and switch at a later common tick.
    follow_s: float = Field(10.0, ge=1)
