"""One typed settings object, read from the environment (prefix GPTFLOW_) and overridable per call."""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

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
    alert_url: str | None = Field(
        default=None,
        description="Apprise URL that run alerts go to (failed or crashed run, promotion, challenger worse than "
        "the champion): json://host:port/path for a plain JSON webhook, slack://..., mailto://...; unset: none.",
    )
    dask_address: str | None = Field(
        default=None,
        description="Dask scheduler (tcp://host:8786) that parallel trainings run on; unset: a local cluster.",
    )
    dask_workers: int = Field(default=2, ge=1, description="Worker processes of the local Dask cluster.")
    download_timeout_s: float = Field(default=60.0, gt=0)
    download_retries: int = Field(default=4, ge=0)

    @field_validator("alert_url", "dask_address", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value is None or str(value).strip() == "" else value

    @field_validator("alert_url")
    @classmethod
    def _alert_url_is_apprise(cls, value: str | None) -> str | None:
        """Refused here rather than at the first alert; the message names the scheme only (URLs hold secrets)."""
        if value is None:
            return None
        import apprise  # lazily: settings are imported everywhere, Apprise matters only with an alert URL

        if apprise.Apprise.instantiate(value) is None:
            scheme = value.split("://", 1)[0] if "://" in value else "none"
            raise ValueError(
                f"Apprise cannot parse this URL (scheme {scheme!r}); expected an Apprise URL such as "
                "json://HOST:PORT/PATH (a JSON webhook), slack://TOKEN_A/TOKEN_B/TOKEN_C or mailto://USER:PASSWORD@HOST"
            )
        return value

    @field_validator("mirror", mode="before")
    @classmethod
    def _empty_mirror_is_none(cls, value):
        return None if value is None or str(value).strip() == "" else value

    @field_validator("mirror")
    @classmethod
    def _mirror_is_a_folder(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} is a file, not a folder; the mirror is a folder of <mirror>/HOST/PATH files")
        if not value.is_dir():
            raise ValueError(f"mirror folder {value} does not exist (expected <mirror>/HOST/PATH files)")
        return value.resolve()

    @field_validator("home")
    @classmethod
    def _home_is_writable(cls, value: Path) -> Path:
        return writable_folder(value)

    @field_validator("ollama_host")
    @classmethod
    def _host_is_a_url(cls, value: str) -> str:
        return ollama_url(value)

    @field_validator("judge_model")
    @classmethod
    def _model_is_a_name(cls, value: str) -> str:
        return ollama_model_name(value)

    @property
    def downloads_dir(self) -> Path:
        return self.home / "downloads"

    def stage_dir(self, stage: str) -> Path:
        return self.home / stage


OLLAMA_PORT = 11434


def ollama_url(value: str) -> str:
    """An Ollama server address as a URL, or ValueError saying what is wrong with it. Like the ollama client,
    `host`, `host:port` and `:port` mean http, port 11434 and 127.0.0.1 by default; the URL must have a host and
    a numeric port, so that a typo fails here instead of deep inside the client."""
    text = value.strip() or "localhost"  # an empty OLLAMA_HOST means the default, as it does to ollama
    expected = "expected http(s)://HOST[:PORT] or HOST[:PORT]"
    bare = "://" not in text
    if bare:
        text = "http://" + (f"127.0.0.1{text}" if text.startswith(":") else text)
    try:
        url = urlsplit(text)
        port = url.port  # a port that is not a number, or out of range, raises here
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL ({exc}); {expected}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"{value!r}: scheme {url.scheme!r} is not http or https; {expected}")
    if not url.hostname:
        raise ValueError(f"{value!r} names no host; {expected}")
    if not re.fullmatch(r"[a-z0-9._:%-]+", url.hostname, re.IGNORECASE):  # names, IPv4, IPv6 (with a zone)
        raise ValueError(f"{value!r}: {url.hostname!r} is not a host name or address; {expected}")
    if port is None and bare:
        return url._replace(netloc=f"{url.netloc}:{OLLAMA_PORT}").geturl().rstrip("/")
    return url.geturl().rstrip("/")


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


def ollama_model_name(value: str) -> str:
    """An Ollama model name (`llama3`, `llama3:8b`, `namespace/model:tag`), or ValueError: a name with spaces or
    other characters Ollama never accepts is refused before any request."""
    if not _MODEL_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an Ollama model name (expected letters, digits and . _ - : /, like llama3 or llama3:8b)"
        )
    return value


def writable_folder(path: Path) -> Path:
    """`path` if it is a folder we can write in, or one that can be created; ValueError naming the obstacle. It is
    not created here: a command that writes nothing leaves no folder behind."""
    existing = path.absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path.absolute() else f" ({existing} is a file)"
        raise ValueError(f"{path} is not a folder{where}; expected a writable folder for the outputs")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing} is not writable; expected a writable folder for the outputs")
    try:  # access() says yes to root everywhere, /proc included: make (and remove) a folder to be sure
        os.rmdir(tempfile.mkdtemp(prefix=".gptflow-probe-", dir=existing))
    except OSError as exc:
        raise ValueError(
            f"cannot create {path} ({exc.strerror or exc} in {existing}); expected a writable folder for the outputs"
        ) from None
    return path


_ENV_NAMES = {"mirror": "GPTFLOW_MIRROR", "home": "GPTFLOW_HOME", "ollama_host": "OLLAMA_HOST"}


def load_settings(**overrides) -> Settings:
    """Build settings from the environment plus explicit overrides; errors name the variable."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = validation_message(exc, _variable, "settings")
        raise SettingsError(f"invalid settings: {problems}") from None


def _variable(loc: tuple) -> str:
    """The environment variable of an error's field; an alias (OLLAMA_HOST) is its own name."""
    name = str(loc[0])
    return name if name.isupper() else _ENV_NAMES.get(name, f"GPTFLOW_{name}".upper())


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from the environment (tests call get_settings.cache_clear())."""
    return load_settings()
