"""Settings: the one place that reads the environment (prefix ``REALIGN_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide configuration, built once and passed into factories."""

    model_config = SettingsConfigDict(env_prefix="REALIGN_", frozen=True, extra="ignore")

    models_cache_dir: Path = Field(
        default=Path("models_cache"),
        description="Root of the artifact store: residuals/, merged/, sources/.",
    )
    store_budget_gb: float | None = Field(
        default=None,
        description="Size budget of the store in GB; least recently used artifacts are "
        "evicted beyond it (artifacts in use never are). None = unlimited.",
    )
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="Where merge math runs.")
    residual_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_shard_gb: float = Field(default=5.0, gt=0, description="Largest output shard in GB.")
    log_level: str = "INFO"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process settings (read from the environment once)."""
    return Settings()
