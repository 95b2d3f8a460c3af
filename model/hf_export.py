"""A language-model checkpoint as a Hugging Face folder (`gptflow export --format hf`), for every family:
`GPT2LMHeadModel`, `LlamaForCausalLM` (SmolLM, Llama 3.x) or `Qwen3ForCausalLM`, with the model's own tokenizer
files (or GPT-2's as vocab.json / merges.txt), read back through our own loader and compared before the stage
certifies it.

The weights are the inverse of `model.hf_models.tensor_map`: our fused q/k/v rows split back into `q_proj`,
`k_proj`, `v_proj` (H, KV, KV heads), the SwiGLU `fc` into `gate_proj` and `up_proj`, GPT-2's Conv1D matrices
transposed to [in, out]. A tied head is written once (`tie_word_embeddings`). `config.json` carries both rotary
spellings: transformers 5's `rope_parameters` and the older `rope_theta` + `rope_scaling` (Llama 3's stretch).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from gptflow.stage import Built, Decision, Stage
from gptflow.storage import atomic_dir, atomic_path, read_json, write_json_atomic, write_text_atomic
from model.config import GPTConfig
from model.files import CHECKPOINT_LMS, WEIGHTS_FILE, WeightsError
from model.genai import tokenizer_config
from model.gpt import GPTModel
from model.hf_models import load_hf_model, part_rows, tensor_map
from model.lm_export import LM_EXPORT_HINT
from model.lm_quality import torch_logits
from model.onnx_export import REPORT, ExportError
from model.opener import open_model
from model.weights import hf_config, hf_state_dict

HF_DIR = "hf"
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
MODEL_FILES = ("config.json", "generation_config.json", WEIGHTS_FILE)
GPT2_TOKENIZER_FILES = ("merges.txt", "tokenizer_config.json", "vocab.json")
# What an export folder may hold: the model's files and any tokenizer's (a Hugging Face tokenizer's named templates
# sit in their own folder).
KNOWN = (
    set(MODEL_FILES)
    | set(GPT2_TOKENIZER_FILES)
    | {
        "tokenizer.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "additional_chat_templates",
    }
)
ROUNDTRIP_ATOL = 1e-5


def hf_export_config(cfg: GPTConfig, dtype: torch.dtype, bos_id: int | None, eos_ids: list[int]) -> dict[str, Any]:
    """The `config.json` transformers builds our model from, for its family (a shape it cannot express is an
    ExportError that names the switch)."""
    _check_expressible(cfg)
    eos: int | list[int] | None = (eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)) if eos_ids else None
    if cfg.family == "gpt2":
        return {**hf_config(cfg, dtype), "bos_token_id": bos_id, "eos_token_id": eos}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        legacy = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_context_length,
        }
        rope = {**legacy, "rope_theta": cfg.rope_theta}
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_weights,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy,
        "rope_parameters": rope,
        "attention_bias": cfg.qkv_bias,
        "attention_dropout": cfg.dropout,
        "mlp_bias": cfg.bias,
        "bos_token_id": bos_id,
        "eos_token_id": eos,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.family == "qwen3":
        config.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.n_layers,
            layer_types=["full_attention"] * cfg.n_layers,
        )
    return config


def _check_expressible(cfg: GPTConfig) -> None:
    """Each family's Hugging Face class has fixed switches; refuse a mix none of them has."""
    if cfg.family == "gpt2":
        fixed = {"norm": "layernorm", "mlp": "gelu", "bias": True, "qk_norm": False}
        odd = [k for k, v in fixed.items() if getattr(cfg, k) != v]
        odd += ["n_kv_heads"] if cfg.kv_heads != cfg.n_heads else []
        odd += ["head_size"] if cfg.head_dim * cfg.n_heads != cfg.emb_dim else []
    else:
        fixed = {"norm": "rmsnorm", "mlp": "swiglu"}
        odd = [k for k, v in fixed.items() if getattr(cfg, k) != v]
        # Hugging Face's attention_bias covers q, k, v and o; our qkv_bias covers q, k, v and bias o and the MLP.
        odd += ["qkv_bias/bias (Hugging Face biases q, k, v and o together)"] if cfg.qkv_bias != cfg.bias else []
    if odd:
        raise ExportError(
            f"a {cfg.family} model with {', '.join(odd)} set as here has no Hugging Face "
            f"{ARCHITECTURES[cfg.family]} equivalent; export it to ONNX instead"
        )


def hf_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our parameters under the Hugging Face names `save_pretrained` writes (`model.hf_models.tensor_map`
    inverted): fused rows split back, Conv1D weights transposed, CPU, contiguous, in the model's dtype."""
    cfg = model.cfg
    if cfg.family == "gpt2":
        return hf_state_dict(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for ours, parts in tensor_map(cfg).items():
        tensor = params[ours].detach().to("cpu")
        for (theirs, transpose), chunk in zip(parts, tensor.split(part_rows(cfg, len(parts), len(tensor)), dim=0)):
            tensors[theirs] = (chunk.t() if transpose else chunk).contiguous()
    return tensors


def save_hf_model(
    model: GPTModel,
    folder: str | Path,
    *,
    tokenizer: Any = None,
    gpt2_files: tuple[Path, Path] | None = None,
) -> Path:
    """Write `model` as a Hugging Face folder of its family that `AutoModelForCausalLM.from_pretrained` loads and
    `model.hf_models.load_hf_model` reads back: config.json, generation_config.json, model.safetensors, and the
    tokenizer: `tokenizer` (an `HFTokenizer`) writes its own files as they are; `gpt2_files` (encoder.json,
    vocab.bpe) GPT-2's as `GPT2Tokenizer` reads them. Built in a temporary sibling folder and renamed into place;
    an earlier export is replaced, a folder holding anything else is refused rather than deleted."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise WeightsError(f"{folder} exists and is not a folder; cannot write a Hugging Face export there")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in KNOWN)
        if foreign:
            raise WeightsError(
                f"{folder} holds files that are not a Hugging Face export ({', '.join(foreign[:5])}"
                f"{' ...' if len(foreign) > 5 else ''}); not replacing it"
            )
    for path in gpt2_files or ():
        if not Path(path).is_file():
            raise WeightsError(f"tokenizer file {path} does not exist (expected encoder.json and vocab.bpe)")
    cfg = model.cfg
    if tokenizer is not None:
        bos, eos_ids, pad = tokenizer.bos_id, list(tokenizer.eos_ids), tokenizer.pad_id
        texts = tokenizer.files
    else:
        gpt2_eot = hf_config(cfg)["eos_token_id"]
        bos, eos_ids, pad, texts = gpt2_eot, ([gpt2_eot] if gpt2_eot is not None else []), None, {}
    config = hf_export_config(cfg, model.tok_emb.weight.dtype, bos, eos_ids)
    if cfg.family != "gpt2":
        config["pad_token_id"] = pad
    tensors = hf_tensors(model)
    try:
        with atomic_dir(folder) as tmp:
            with atomic_path(tmp / WEIGHTS_FILE) as part:  # also gives the file the usual mode (safetensors: 0600)
                save_file(tensors, part, metadata={"format": "pt"})
            del tensors
            write_json_atomic(tmp / "config.json", config)
            if "generation_config.json" not in texts:
                generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
                write_json_atomic(tmp / "generation_config.json", generation)
            for name, text in texts.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(tmp / name, text)
            if gpt2_files is not None and tokenizer is None:
                encoder_json, vocab_bpe = gpt2_files
                shutil.copyfile(encoder_json, tmp / "vocab.json")
                shutil.copyfile(vocab_bpe, tmp / "merges.txt")
                write_json_atomic(tmp / "tokenizer_config.json", tokenizer_config(cfg.context_length))
    except OSError as exc:
        raise WeightsError(f"cannot write a Hugging Face export to {folder}: {exc}") from None
    return folder


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path | None,
    *,
    tokenizer_files: tuple[Path, Path] | None = None,
    settings=None,
    resume: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Language-model checkpoint -> a Hugging Face folder of its family (`hf/` in the stage folder: config.json,
    model.safetensors, the tokenizer's files) that transformers loads; read back through our loader, whose logits
    must equal the checkpoint's. `tokenizer_files` (GPT-2's encoder.json, vocab.bpe) serve a model that reads GPT-2's
    vocabulary (fetched through the download layer when not given); a model with its own tokenizer ships its files."""
    opened = open_model(checkpoint, CHECKPOINT_LMS, hint=LM_EXPORT_HINT)
    path = opened.path
    stage = Stage.declare(
        "export",
        inputs={"checkpoint": path},
        config={"format": "hf"},
        code=__name__,
        label=f"hf-{path.parent.name}",
        out_dir=out_dir,
        force=force,
    )

    def build(decision: Decision) -> Built:
        model, cfg = opened.language_model(), opened.config
        files = opened.state.get("tokenizer") if opened.state is not None else None
        tokenizer, gpt2_files = None, None
        if files:
            from edge.hf_tokenizer import HFTokenizer

            tokenizer = HFTokenizer.from_files(files)
        else:
            from gptflow.tokenizer import tokenizer_files as fetch_gpt2_files

            gpt2_files = tokenizer_files or fetch_gpt2_files(settings)
        folder = save_hf_model(model, stage.dir / HF_DIR, tokenizer=tokenizer, gpt2_files=gpt2_files)
        diff = roundtrip_diff(model, folder)
        report = {
            "checkpoint": str(path),
            "kind": "hf",
            "family": cfg.family,
            "architecture": ARCHITECTURES[cfg.family],
            "folder": str(folder),
            "tokenizer": "gpt2" if tokenizer is None else "tokenizer.json",
            "roundtrip_max_abs_logit_diff": diff,
        }
        write_json_atomic(stage.dir / REPORT, report)
        outputs = sorted(p.relative_to(stage.dir).as_posix() for p in folder.rglob("*") if p.is_file())
        return Built([REPORT] + outputs, {"roundtrip": diff, "family": cfg.family})

    result = stage.run(build, resume=resume)
    return {**read_json(stage.dir / REPORT), "out_dir": str(stage.dir), "reused": result.reused}


def roundtrip_diff(model: GPTModel, folder: Path) -> float:
    """Max |logit difference| between `model` and the folder read back by our loader (an ExportError above
    ROUNDTRIP_ATOL)."""
    reloaded, _ = load_hf_model(folder, dtype=model.tok_emb.weight.dtype)
    cfg = model.cfg
    row = [(7 * i + 3) % cfg.vocab_size for i in range(min(16, cfg.context_length))]
    diff = float(np.abs(torch_logits(model, row) - torch_logits(reloaded, row)).max())
    if not diff <= ROUNDTRIP_ATOL:
        raise ExportError(f"{folder} does not read back to the same model (max |logit diff| {diff:.3g})")
    return diff
