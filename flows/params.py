"""The pipeline's one parameter model: every stage's config in one validated object.

Its defaults are the recipe in `configs/pipeline.yaml` (what `make run`, `gptflow pipeline` and the nightly
deployment run). Prefect validates it before the run starts; `gptflow pipeline --config FILE` overrides any
subset from YAML or JSON (`configs/tiny.yaml` for tests and the end-to-end check).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from data.config import CsvDataConfig, InstructionDataConfig, SpamDataConfig
from eval.champion import PromotionConfig
from eval.judge import JudgeConfig
from gptflow.errors import GptflowError, validation_message
from gptflow.storage import read_config_file
from gptflow.strict import StrictConfig
from model.configs import ClassifierConfig, DeviceSpec, ExportConfig, InspectConfig, InstructConfig, PretrainConfig

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "pipeline.yaml"
TRAINING_STAGES = ("pretrain", "classifier", "instruct")


class PipelineConfigError(GptflowError, ValueError):
    """A pipeline config file or parameter is invalid."""


class PipelineParams(StrictConfig):
    """A field left out takes its value from `configs/pipeline.yaml`, else from its stage config's default: a
    partial mapping (a config file, a Prefect run's parameters) changes only the fields it names."""

    weights: str = Field(
        default="pretrain",
        description="pretrain (from scratch on `corpus`), "
        "gpt2:<gpt2-small|gpt2-medium|gpt2-large|gpt2-xl|path to model.safetensors> or hf:<Hugging Face repo or "
        "model folder> (GPT-2, Llama family, Qwen3: fine-tuned with its own tokenizer and chat template)",
    )
    corpus: str = Field(
        default="tinyshakespeare", description="pretraining corpus: a name, or a UTF-8 text file (path or http(s) URL)"
    )
    classifier_data: str = Field(
        default="spam",
        description="the classifier's data: spam (the UCI set, pinned by sha256) or a labelled CSV/TSV (path or "
        "http(s) URL, checked for new content on every run)",
    )
    text_column: str = Field(default="text", min_length=1, description="text column of a classifier_data CSV")
    label_column: str = Field(default="label", min_length=1, description="label column of a classifier_data CSV")
    instructions_data: str = Field(
        default="instruction-data",
        description="instruction-data (the book's file, pinned) or an instruction JSON/JSONL (path or http(s) URL)",
    )
    device: DeviceSpec | None = Field(
        default=None, description="device of every training stage left at auto (None: each stage's own)"
    )
    spam: SpamDataConfig = SpamDataConfig()
    instructions: InstructionDataConfig = InstructionDataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    instruct: InstructConfig = InstructConfig()
    export: ExportConfig = ExportConfig()
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    require_judge: bool = Field(default=False, description="fail (not skip) the run when no judge is reachable")
    probe_text: str = Field(
        default="Every effort moves you", min_length=1, description="the text the inspect stage looks at both models on"
    )
    inspect: InspectConfig = InspectConfig()
    promotion: PromotionConfig = PromotionConfig()
    timeout_minutes: float | None = Field(
        default=None, gt=0, description="fail the run (state TimedOut, an alert) after this many minutes"
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _deep_merge(recipe(), data)
        if data.get("device"):  # the default for every training stage that keeps `auto`
            for stage in TRAINING_STAGES:
                config = data.get(stage) or {}
                if isinstance(config, BaseModel):
                    config = config.model_dump()
                if config.get("device", "auto") == "auto":
                    data[stage] = {**config, "device": data["device"]}
        return data

    @field_validator("weights")
    @classmethod
    def _weights_source(cls, value: str) -> str:
        kind, sep, ref = value.partition(":")
        if value == "pretrain" or (kind in ("gpt2", "hf") and sep and ref.strip()):
            return value
        raise ValueError(f"expected 'pretrain', 'gpt2:<name-or-path>' or 'hf:<repo-or-folder>', got {value!r}")

    @property
    def weights_kind(self) -> str:
        """pretrain, gpt2 or hf."""
        return self.weights.partition(":")[0]

    @property
    def gpt2_source(self) -> str:
        """The GPT-2 preset or path of `gpt2:...` weights, or the Hugging Face repo or folder of `hf:...` ones."""
        return self.weights.partition(":")[2].strip()

    def data_sources(self) -> dict[str, str]:
        """The inputs a run checks for new content (a registered name is pinned): role -> name, path or URL."""
        sources = {
            "classifier": "sms-spam" if self.classifier_data == "spam" else self.classifier_data,
            "instructions": self.instructions_data,
        }
        if self.weights == "pretrain":
            sources["corpus"] = self.corpus
        return sources

    def csv_config(self) -> CsvDataConfig:
        """How a classifier_data CSV is read, cleaned and split: the spam set's settings and the two columns."""
        return CsvDataConfig(**self.spam.model_dump(), text_column=self.text_column, label_column=self.label_column)

    def with_preset(self, preset: str) -> "PipelineParams":
        return self.merged({"pretrain": {"preset": preset}})

    def merged(self, overrides: dict[str, Any]) -> "PipelineParams":
        """These params with nested fields replaced (`{"pretrain": {"steps": 10}}`), validated."""
        data = _deep_merge(self.model_dump(mode="json"), overrides)
        try:
            return PipelineParams.model_validate(data)
        except ValidationError as exc:
            raise PipelineConfigError(validation_message(exc, whole="params")) from None


def load_params(path: str | Path | None = None, preset: str | None = None) -> PipelineParams:
    """The recipe, overridden by a YAML/JSON file (any subset of fields), then by `preset`."""
    params = PipelineParams()
    if path is not None:
        try:
            data = read_config_file(path)
        except GptflowError as exc:
            raise PipelineConfigError(f"pipeline config: {exc}") from None
        try:
            params = params.merged(data)
        except PipelineConfigError as exc:
            raise PipelineConfigError(f"{path}: {exc}") from None
    if preset is not None:
        params = params.with_preset(preset)
    return params


@functools.cache
def recipe() -> dict[str, Any]:
    """`configs/pipeline.yaml`, read once per process."""
    return read_config_file(RECIPE)


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
