"""One typed settings object, read from the environment (prefix GPTFLOW_) and overridable per call."""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gptflow.errors import GptflowError, validation_message


class SettingsError(GptflowError, ValueError):
    """An environment variable holds a value the pipeline cannot use."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPTFLOW_", extra="ignore")

    mirror: Path | None = Field(
        default=None,
        description="Offline mirror root: https://HOST/PATH is read from <mirror>/HOST/PATH and nothing "
        "is fetched from the network.",
    )
    home: Path = Field(default=Path("outputs"), description="Root folder of every output and cache.")
    ollama_host: str = Field(
        default="http://localhost:11434",
        validation_alias=AliasChoices("OLLAMA_HOST", "GPTFLOW_OLLAMA_HOST"),
        description="Ollama server that runs the judge model.",
    )
    judge_model: str = Field(default="llama3", description="Ollama model that scores responses.")
    download_timeout_s: float = Field(default=60.0, gt=0)
    download_retries: int = Field(default=4, ge=0)

    @field_validator("mirror", mode="before")
    @classmethod
    def _empty_mirror_is_none(cls, value):
        return None if value is None or str(value).strip() == "" else value

    @field_validator("mirror")
    @classmethod
    def _mirror_is_a_folder(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_dir():
            raise ValueError(f"mirror folder {value} does not exist (expected <mirror>/HOST/PATH files)")
        return value.resolve()

    @field_validator("ollama_host")
    @classmethod
    def _host_has_scheme(cls, value: str) -> str:
        value = value.strip()
        if "://" not in value:  # ollama accepts "host:port"; we normalise the same way it does
            value = "http://" + value
        return value.rstrip("/")

    @property
    def downloads_dir(self) -> Path:
        return self.home / "downloads"

    def stage_dir(self, stage: str) -> Path:
        return self.home / stage


_ENV_NAMES = {"mirror": "GPTFLOW_MIRROR", "home": "GPTFLOW_HOME", "ollama_host": "OLLAMA_HOST"}


def load_settings(**overrides) -> Settings:
    """Build settings from the environment plus explicit overrides; errors name the variable."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = validation_message(exc, lambda loc: _ENV_NAMES.get(loc[0], f"GPTFLOW_{loc[0]}".upper()), "settings")
        raise SettingsError(f"invalid settings: {problems}") from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from the environment (tests call get_settings.cache_clear())."""
    return load_settings()
