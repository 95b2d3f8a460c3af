"""`gptflow export --format peft`: a LoRA checkpoint's adapters as a peft adapter folder that
`PeftModel.from_pretrained` loads onto our Hugging Face export of the base with the unmerged model's logits (fp32),
for GPT-2 (q/k/v fused in one Conv1D: one adapter of rank n*r), Llama and Qwen3 (one module per slice), and after
peft's `merge_and_unload` too (an adapted tied head untied first, as the adapter's README says); a LoRA checkpoint on
a LoRA base; adapters on some blocks only; the CLI through its flow; the one-line refusals of whole weights and
classifiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

pytest.importorskip("transformers")
pytest.importorskip("peft")

from cli import main  # noqa: E402
from gptflow.stage import file_digest  # noqa: E402
from model import lora  # noqa: E402
from model.checkpoint import save_model  # noqa: E402
from model.classifier import SequenceClassifier, save_classifier  # noqa: E402
from model.configs import LoraSpec  # noqa: E402
from model.files import CHECKPOINT_LMS  # noqa: E402
from model.gpt import GPTModel  # noqa: E402
from model.hf_export import export_hf  # noqa: E402
from model.init import InitSpec  # noqa: E402
from model.onnx_export import ExportError  # noqa: E402
from model.opener import open_model  # noqa: E402
from model.peft_export import ADAPTER_DIR, export_peft  # noqa: E402

LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_heads=1, bias=False, qkv_bias=False)
FAMILIES = {"gpt2": {}, "llama": LLAMA, "qwen3": dict(LLAMA, qk_norm=True, head_size=48)}
IDS = torch.randint(0, 50257, (3, 24), generator=torch.Generator().manual_seed(0))


def base_model(family: str, seed: int = 3, **fields) -> GPTModel:
    """A tiny model whose every parameter is random (norms near 1), so that logits depend on every layer."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_config("gpt", **FAMILIES[family], **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.05)
    return model


def lora_checkpoint(path: Path, model, base: Path, targets: tuple, seed: int = 1, modules=None, **spec) -> Path:
    """`model` (the base's weights) with adapters whose B is random (B = 0 would prove nothing), saved; `modules`:
    the adapted slices, if not those `targets` plans."""
    record = lora.base_record(InitSpec(f"checkpoint:{base}"), file_digest(base))
    lora.apply_lora(model, LoraSpec(targets=targets, **spec), record, modules)
    torch.manual_seed(seed)
    for _, layer in lora.lora_layers(model):
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b, std=0.2)
    return save_model(path, model)


def peft_logits(base_checkpoint: Path, adapter: Path, out: Path, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's logits with the adapter loaded onto our Hugging Face export of the base, and after `merge_and_unload`
    (an adapted head untied from the embedding first, as the adapter's README says)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = Path(export_hf(base_checkpoint, out, settings=settings)["folder"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    if "lm_head" in json.loads((adapter / "adapter_config.json").read_text())["target_modules"]:
        base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())
        base.config.tie_word_embeddings = False
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    with torch.no_grad():
        return model(IDS).logits, merged(IDS).logits


def ours(checkpoint: Path) -> torch.Tensor:
    model = open_model(checkpoint, ("lm", "instruct")).language_model(merged=False)
    assert lora.is_lora(model)
    with torch.no_grad():
        return model(IDS)


CASES = [
    ("gpt2", ("query", "value")),
    ("gpt2", ("all",)),
    ("llama", ("query", "value")),
    ("llama", ("all",)),
    ("qwen3", ("attention", "mlp")),
]


@pytest.mark.parametrize("family, targets", CASES, ids=[f"{f}-{'+'.join(t)}" for f, t in CASES])
def test_peft_loads_the_adapter_onto_our_hf_export_with_the_unmerged_logits(tmp_path, settings, family, targets):
    base = save_model(tmp_path / "base" / "model.pt", base_model(family))
    tuned = lora_checkpoint(tmp_path / "tuned" / "model.pt", base_model(family), base, targets, rank=4, alpha=8)
    report = export_peft(tuned, tmp_path / "peft", settings=settings)
    folder = Path(report["folder"])
    assert folder == tmp_path / "peft" / ADAPTER_DIR and not report["reused"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (
        report["rank"] == 4 and report["targets"] == list(targets) and report["checkpoint_sha256"] == file_digest(tuned)
    )
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["fan_in_fan_out"] is (family == "gpt2")
    if family == "gpt2":  # q and v fused into c_attn: one adapter of rank 2r, alpha 2 alpha (the same scale)
        assert config["rank_pattern"] == {"attn.c_attn": 8 if targets == ("query", "value") else 12}
        assert config["alpha_pattern"] == {"attn.c_attn": 16 if targets == ("query", "value") else 24}
    else:
        assert config["rank_pattern"] == {} and "self_attn.q_proj" in config["target_modules"]
    if "all" in targets:
        assert "lm_head" in config["target_modules"]
    readme = (folder / "README.md").read_text()
    assert file_digest(base) in readme and f"checkpoint:{base}" in readme and "PeftModel.from_pretrained" in readme

    got, merged = peft_logits(base, folder, tmp_path / "hf", settings)
    expected = ours(tuned)
    diff, merged_diff = (got - expected).abs().max().item(), (merged - expected).abs().max().item()
    print(f"max |logit diff| vs ours, {family} {targets}: peft {diff:.3g}, peft merged {merged_diff:.3g}")
    assert diff < 1e-5 and merged_diff < 1e-5
    with torch.no_grad():
        base_logits = open_model(base, CHECKPOINT_LMS).language_model()(IDS)
    assert (base_logits - expected).abs().max().item() > 1e-2  # the adapters change the model: the test means something

    again = export_peft(tuned, tmp_path / "peft", settings=settings)
    assert again["reused"] and again["folder"] == report["folder"]


def test_adapters_on_a_lora_base_load_onto_its_merged_export(tmp_path, settings):
    base = save_model(tmp_path / "base" / "model.pt", base_model("llama"))
    first = lora_checkpoint(tmp_path / "first" / "model.pt", base_model("llama"), base, ("attention", "head"))
    merged = open_model(first, CHECKPOINT_LMS).language_model()  # the second fine-tune starts from the merged model
    second = lora_checkpoint(tmp_path / "second" / "model.pt", merged, first, ("query", "value"), seed=2)
    report = export_peft(second, tmp_path / "peft", settings=settings)
    assert "itself a LoRA checkpoint" in (Path(report["folder"]) / "README.md").read_text()
    got, merged = peft_logits(first, Path(report["folder"]), tmp_path / "hf", settings)
    expected = ours(second)
    diff, merged_diff = (got - expected).abs().max().item(), (merged - expected).abs().max().item()
    print(f"max |logit diff| vs ours, LoRA on a LoRA base: peft {diff:.3g}, peft merged {merged_diff:.3g}")
    assert diff < 1e-5 and merged_diff < 1e-5


def test_adapters_on_some_blocks_only_name_their_modules_in_full(tmp_path, settings):
    """Block 1's q and v only (a checkpoint's recorded modules): `attn.c_attn` would adapt block 0 too, so the
    config names full module paths, and the fused rank pattern follows them."""
    base = save_model(tmp_path / "base" / "model.pt", base_model("gpt2"))
    modules = {"blocks.1.attn.qkv": {"query": (0, 64), "value": (128, 192)}}
    tuned = lora_checkpoint(
        tmp_path / "tuned" / "model.pt", base_model("gpt2"), base, ("query", "value"), modules=modules
    )
    folder = Path(export_peft(tuned, tmp_path / "peft", settings=settings)["folder"])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == ["transformer.h.1.attn.c_attn"]
    assert config["rank_pattern"] == {"transformer.h.1.attn.c_attn": 16}
    got, merged = peft_logits(base, folder, tmp_path / "hf", settings)
    expected = ours(tuned)
    diff, merged_diff = (got - expected).abs().max().item(), (merged - expected).abs().max().item()
    print(f"max |logit diff| vs ours, gpt2 block 1 only: peft {diff:.3g}, peft merged {merged_diff:.3g}")
    assert diff < 1e-5 and merged_diff < 1e-5


def test_whole_weights_and_classifiers_are_refused_in_one_line(tmp_path, settings, capsys):
    base = save_model(tmp_path / "base" / "model.pt", base_model("gpt2"))
    with pytest.raises(ExportError, match=r"holds whole weights, not LoRA adapters: nothing to export") as info:
        export_peft(base, tmp_path / "peft", settings=settings)
    assert "\n" not in str(info.value) and "--format hf" in str(info.value)
    assert not (tmp_path / "peft").exists()
    assert main(["export", str(base), "--format", "peft"]) == 2  # refused before any flow runs
    assert "holds whole weights, not LoRA adapters" in capsys.readouterr().err

    classifier = SequenceClassifier(base_model("gpt2"), 2)
    lora.apply_lora(classifier, LoraSpec(), lora.base_record(InitSpec(f"checkpoint:{base}"), file_digest(base)))
    best = save_classifier(tmp_path / "clf" / "best.pt", classifier, {"ham": 0, "spam": 1}, 32, {"data": "test"})
    with pytest.raises(ExportError, match=r"is a classifier checkpoint: .*export the classifier to ONNX") as info:
        export_peft(best, tmp_path / "peft", settings=settings)
    assert "\n" not in str(info.value) and not (tmp_path / "peft").exists()
    assert main(["export", str(best), "--format", "peft"]) == 2
    assert "export the classifier to ONNX" in capsys.readouterr().err


def test_export_cli_writes_the_adapter_through_the_flow(prefect_harness, tmp_path, settings, capsys):
    base = save_model(tmp_path / "base" / "model.pt", base_model("qwen3"))
    tuned = lora_checkpoint(tmp_path / "tuned" / "model.pt", base_model("qwen3"), base, ("query", "value"))
    assert main(["export", str(tuned), "--format", "peft", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    folder = tmp_path / "out" / ADAPTER_DIR
    assert f"wrote peft adapter (rank 8, modules self_attn.q_proj, self_attn.v_proj): {folder}" in printed
    assert "PeftModel.from_pretrained(" in printed and (folder / "adapter_model.safetensors").is_file()
