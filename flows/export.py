"""Export flows: a classifier to its edge bundle; a language model to its LM bundle, a Hugging Face folder or a GGUF
bundle; a LoRA language model's adapters to a peft adapter folder."""

from __future__ import annotations

from prefect import flow

from model.configs import ExportConfig
from tasks.export import export_bundle, export_gguf_bundle, export_hf_folder, export_lm_bundle, export_peft_adapter


@flow(name="export")
def export_flow(
    checkpoint: str,
    data_dir: str,
    config: ExportConfig = ExportConfig(),
    out_dir: str | None = None,
    force: bool = False,
) -> dict:
    """`data_dir`: the data stage folder whose test split checks parity and the int8 gate. Outputs go to `out_dir`,
    else to the folder the stage contract names (`<home>/export/<checkpoint folder>-<key>`); the bundle is its
    `bundle/` folder. `force`: `out_dir` may hold files gptflow did not write."""
    return export_bundle(str(checkpoint), data_dir, config, out_dir, force)


@flow(name="export-lm")
def export_lm_flow(
    checkpoint: str,
    data_dir: str | None = None,
    config: ExportConfig = ExportConfig(),
    out_dir: str | None = None,
    force: bool = False,
) -> dict:
    """A language model of any family (GPT-2, Llama, Qwen3) to its LM bundle, the stage folder's `bundle/`.
    `data_dir`: an instructions data folder (validation perplexity, test prompts for int8 agreement) or a corpus
    folder (val.bin), encoded with the model's own tokenizer; None: fp32 needs none, int8 measures on the data the
    checkpoint records."""
    return export_lm_bundle(str(checkpoint), data_dir, config, out_dir, force)


@flow(name="export-hf")
def export_hf_flow(checkpoint: str, out_dir: str | None = None, force: bool = False) -> dict:
    """A language model as a Hugging Face folder of its family (GPT2LMHeadModel, LlamaForCausalLM,
    Qwen3ForCausalLM) with its tokenizer: the stage folder's `hf/`."""
    return export_hf_folder(str(checkpoint), out_dir, force)


@flow(name="export-peft")
def export_peft_flow(checkpoint: str, out_dir: str | None = None, force: bool = False) -> dict:
    """A LoRA language model's adapters as a peft adapter folder (adapter_config.json, adapter_model.safetensors,
    README.md) that `PeftModel.from_pretrained` loads onto the Hugging Face export of its base: the stage folder's
    `adapter/`."""
    return export_peft_adapter(str(checkpoint), out_dir, force)


@flow(name="export-gguf")
def export_gguf_flow(
    checkpoint: str, config: ExportConfig = ExportConfig(), out_dir: str | None = None, force: bool = False
) -> dict:
    """A language model as a GGUF bundle (`model.gguf`, `Modelfile`) for llama.cpp and Ollama: the stage folder's
    `bundle/`, in `config.quant`."""
    return export_gguf_bundle(str(checkpoint), config, out_dir, force)
