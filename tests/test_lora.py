"""LoRA: adapters on the fused layers of every family (exact parameter counts), the base's output at the start, merge
equal to the unmerged model, classifier and instruction fine-tunes whose checkpoints hold adapters and a base record,
exact resume, domain pretraining with adapters under a LoRA classifier, a missing or changed base, `gptflow merge`,
and exports that merge on the way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from classify_data import write_splits
from conftest import tiny_config

from cli import main
from gptflow.stage import file_digest
from model import lora
from model.checkpoint import load_checkpoint, save_model
from model.classifier import SequenceClassifier, collate
from model.config import GPTConfig
from model.configs import DaptConfig, LoraSpec
from model.files import CHECKPOINT_LMS, CLASSIFIERS, CheckpointError
from model.finetune_classifier import finetune, pretrain_domain
from model.gpt import GPTModel
from model.init import InitSpec
from model.merge import merge_checkpoint
from model.opener import open_model

REPO = Path(__file__).resolve().parent.parent
LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_heads=1, bias=False, qkv_bias=False)
X = torch.tensor([[15496, 11, 995, 318, 257, 1332], [464, 3290, 13, 50256, 50256, 50256]])


QWEN3 = dict(LLAMA, qk_norm=True, head_size=48)  # q/k norms, heads wider than emb / heads: q rows 96, kv rows 48
FAMILIES = {"gpt2": {}, "llama": LLAMA, "qwen3": QWEN3}


def gpt(family: str = "gpt2", seed: int = 0, **fields) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("tiny", **FAMILIES[family], **fields)).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Training leaves B non-zero; a merge test with B = 0 would prove nothing."""
    torch.manual_seed(seed)
    for _, layer in lora.lora_layers(model):
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b, std=0.05)


def base_checkpoint(tmp_path, family: str = "gpt2") -> str:
    path = save_model(tmp_path / "base" / "model.pt", gpt(family, seed=3))
    return f"checkpoint:{path}"


# --- the adapters -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, targets, expected",
    [
        # tiny: emb 64, 2 layers, MLP 256; rank 8: an adapter on (out rows, in) has 8 x (in + rows) parameters
        ("gpt2", ("query", "value"), 2 * (8 * (64 + 64) * 2)),
        ("gpt2", ("all",), 2 * (8 * 128 * 3 + 8 * 128 + 8 * (64 + 256) * 2) + 8 * (64 + 50257)),
        # Llama: 2 heads of 32, one key/value head (value rows 32); SwiGLU gate and up are separate adapters
        ("llama", ("query", "value"), 2 * (8 * (64 + 64) + 8 * (64 + 32))),
        ("llama", ("mlp",), 2 * (8 * (64 + 256) * 3)),
        ("qwen3", ("attention",), 2 * (8 * (64 + 96) + 8 * (64 + 48) * 2 + 8 * (96 + 64))),
    ],
)
def test_trainable_parameters_are_exactly_the_adapters(family, targets, expected):
    model = gpt(family)
    assert lora.apply_lora(model, LoraSpec(targets=targets)) == expected
    assert all(p.requires_grad == (".lora_" in name) for name, p in model.named_parameters())


def test_the_book_count_every_linear_layer_of_gpt2_small_rank_16():
    """Appendix E wraps every Linear of GPT-2 124M at rank 16: 2,666,528 with a LoRA head of 2 outputs. Our new
    head trains fully instead (768 x 2 + 2), the blocks' adapters are the book's own 2,654,208."""
    with torch.device("meta"):
        model = SequenceClassifier(GPTModel(GPTConfig.from_preset("gpt2-small")), 2)
    assert lora.apply_lora(model, LoraSpec(rank=16, alpha=16, targets=("all",))) == 2_654_208 + 768 * 2 + 2


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_adapters_start_as_the_base_and_merge_into_the_same_model(family):
    model = gpt(family, tie_weights=True)
    reference = model(X)
    lora.apply_lora(model, LoraSpec(targets=("all",), dropout=0.1))
    assert torch.equal(model(X), reference)  # B = 0
    randomize_adapters(model)
    adapted = model(X)
    assert (adapted - reference).abs().max() > 0.1
    lora.merge(model)
    assert not list(lora.lora_layers(model)) and not lora.is_lora(model)
    assert (model(X) - adapted).abs().max() < 1e-5
    assert model.cfg.tie_weights is False  # an adapted tied head is its own matrix once merged
    assert not torch.equal(model.out_head.weight, model.tok_emb.weight)


def test_targets_that_adapt_nothing_and_a_head_adapter_in_the_fused_loss():
    with pytest.raises(CheckpointError, match=r"LoRA targets \['head'\] adapt no layer"):
        lora.apply_lora(SequenceClassifier(gpt(), 2), LoraSpec(targets=("head",)))  # its head trains fully
    model = gpt()
    lora.apply_lora(model, LoraSpec(targets=("head",)))
    randomize_adapters(model)
    with torch.no_grad():
        assert torch.allclose(model.features(X) @ model.head_weight().T, model(X), atol=1e-5)


# --- fine-tuning ----------------------------------------------------------------------------------------------------

CLASSIFIER = dict(trainable="lora", lora_targets=("all",), lr=3e-3, epochs=2, batch_size=8, eval_every=3)
CLASSIFIER |= dict(checkpoint_every=3, patience=None, keep="last")


@pytest.mark.slow
def test_a_lora_classifier_keeps_adapters_and_head_resumes_exactly_and_merges(tmp_path, tokenizer, settings):
    data = write_splits(tmp_path / "data", (10, 3, 3))  # 30 train texts: 4 steps per epoch, 8 steps
    init = base_checkpoint(tmp_path)
    config = tiny_config("classifier", init=init, **CLASSIFIER)
    full = finetune(data, tmp_path / "full", config, tokenizer=tokenizer)
    assert full.summary["trainable_params"] == 2 * (8 * 128 * 3 + 8 * 128 + 8 * 320 * 2) + 64 * 3 + 3

    state = load_checkpoint(full.best)
    assert set(state["model"]) == {k for k in state["model"] if ".lora_" in k} | {"head.weight", "head.bias"}
    assert state["base"] == {
        "init": init,
        "path": init.partition(":")[2],
        "sha256": file_digest(full.best.parent.parent / "base" / "model.pt"),
    }
    assert state["lora"]["rank"] == 8 and state["lora"]["targets"] == ["all"]
    assert full.best.stat().st_size < (tmp_path / "base" / "model.pt").stat().st_size / 3
    assert set(load_checkpoint(full.out_dir / "last.pt")["model"]) == set(state["model"])

    def crash(record):
        if record["kind"] == "eval" and record["step"] == 6:
            raise KeyboardInterrupt  # after step 6's evaluation, before its checkpoint: resume replays 4-6

    with pytest.raises(KeyboardInterrupt):
        finetune(data, tmp_path / "resumed", config, tokenizer=tokenizer, on_log=crash)
    resumed = finetune(data, tmp_path / "resumed", config, tokenizer=tokenizer)
    evals = [[h for h in r.history if h["kind"] == "eval"] for r in (full, resumed)]
    assert evals[0] == evals[1]
    a, b = load_checkpoint(full.out_dir / "last.pt")["model"], load_checkpoint(resumed.out_dir / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    opened = open_model(full.best, CLASSIFIERS)
    merged, unmerged = opened.classifier().model, opened.classifier(merged=False).model
    assert lora.is_lora(unmerged) and not lora.is_lora(merged)
    x, mask, _ = collate([[15496, 11, 995], [464, 3290, 13, 318, 257]])
    with torch.no_grad():
        assert (merged(x, mask) - unmerged(x, mask)).abs().max() < 1e-5
    # the frozen weights are the base's: norms and embeddings untouched, adapted matrices moved
    base = open_model(tmp_path / "base" / "model.pt", CHECKPOINT_LMS).language_model().state_dict()
    tuned = merged.backbone.state_dict()
    assert torch.equal(tuned["tok_emb.weight"], base["tok_emb.weight"])
    assert torch.equal(tuned["blocks.1.norm2.weight"], base["blocks.1.norm2.weight"])
    assert not torch.equal(tuned["blocks.1.mlp.fc.weight"], base["blocks.1.mlp.fc.weight"])

    # gptflow merge: a plain best.pt with the same logits, reused the second time
    report = merge_checkpoint(full.best, tmp_path / "merged")
    plain = load_checkpoint(report["merged"])
    assert "lora" not in plain and "base" not in plain and plain["labels"] == state["labels"]
    assert plain["source"]["merged_from"] == str(full.best)
    again = open_model(report["merged"], CLASSIFIERS).classifier().model
    with torch.no_grad():
        assert (again(x, mask) - merged(x, mask)).abs().max() < 1e-6
    assert merge_checkpoint(full.best, tmp_path / "merged")["reused"]

    # the edge bundle holds the merged weights: ONNX logits equal PyTorch's
    from model.configs import ExportConfig
    from model.onnx_export import export_classifier

    report = export_classifier(full.best, data, tmp_path / "export", ExportConfig(int8=False), tokenizer=tokenizer)
    assert report["parity"]["fp32_max_abs_logit_diff"] < 1e-4
    assert report["parity"]["fp32_prediction_matches"] == report["parity"]["n"] == 9


def test_a_missing_or_changed_base_is_one_line_that_names_it(tmp_path):
    base = tmp_path / "base" / "model.pt"
    save_model(base, gpt(seed=3))
    model = gpt(seed=3)
    lora.apply_lora(model, LoraSpec(), lora.base_record(InitSpec(f"checkpoint:{base}"), file_digest(base)))
    randomize_adapters(model)
    tuned = save_model(tmp_path / "tuned" / "model.pt", model)
    unmerged = open_model(tuned, CHECKPOINT_LMS).language_model(merged=False)
    with torch.no_grad():
        assert torch.equal(unmerged(X), model(X))
        assert (open_model(tuned, CHECKPOINT_LMS).language_model()(X) - model(X)).abs().max() < 1e-5
    with pytest.raises(CheckpointError, match="holds plain weights, not LoRA adapters"):
        merge_checkpoint(base, tmp_path / "m")

    save_model(base, gpt(seed=4))  # another model at the same path
    with pytest.raises(CheckpointError, match=r"LoRA checkpoint of base .*model.pt with sha256 \w{12}, but that file"):
        open_model(tuned, CHECKPOINT_LMS).language_model()
    base.unlink()
    with pytest.raises(CheckpointError, match=r"LoRA checkpoint of base .*base/model.pt \(sha256 \w{12}\), which is"):
        open_model(tuned, CHECKPOINT_LMS).language_model()


@pytest.mark.slow
def test_instruction_lora_then_generate_and_export_merged(tmp_path, tokenizer, settings):
    import json

    entries = [{"instruction": f"What is {i} plus one?", "input": "", "output": f"It is {i + 1}."} for i in range(12)]
    data = tmp_path / "instructions"
    data.mkdir()
    for name, part in {"train": entries[:8], "validation": entries[8:10], "test": entries[10:]}.items():
        (data / f"{name}.json").write_text(json.dumps(part))
    from model.instruct import finetune as instruct

    config = tiny_config(
        "instruct", init=base_checkpoint(tmp_path, "llama"), trainable="lora", lora_targets=("attention", "head"),
        lr=3e-3, batch_size=2, max_steps=6, eval_every=3, eval_batches=1, log_every=1, max_new_tokens=4,
    )  # fmt: skip
    result = instruct(data, tmp_path / "tuned", config, tokenizer=tokenizer)
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    assert losses[-1] < losses[0]
    state = load_checkpoint(result.model_path)
    assert state["style"] == "alpaca" and state["lora"]["targets"] == ["attention", "head"]
    assert state["config"]["tie_weights"] is False  # the merged model's: the adapted head is its own
    assert "out_head.lora_B.head" in state["model"] and "tok_emb.weight" not in state["model"]

    # every reader merges on the way: the Hugging Face export reads back within its round-trip tolerance
    from model.hf_export import export_hf

    report = export_hf(result.model_path, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    assert report["roundtrip_max_abs_logit_diff"] < 1e-5
    assert main(["generate", "What is 1 plus one?", "--model", str(result.model_path), "--max-new-tokens", "3"]) == 0

    # the GGUF holds the merged head
    import gguf

    from model.configs import ExportConfig
    from model.gguf_export import export_gguf

    written = export_gguf(result.model_path, tmp_path / "gguf", ExportConfig(format="gguf", quant="f16"))
    tensors = {t.name: t for t in gguf.GGUFReader(written["gguf"]).tensors}
    merged = open_model(result.model_path, CHECKPOINT_LMS).language_model()
    output = torch.from_numpy(tensors["output.weight"].data.astype("float32")).reshape(merged.out_head.weight.shape)
    assert (output - merged.out_head.weight).abs().max() < 1e-3
    assert not torch.allclose(output, merged.tok_emb.weight, atol=1e-3)


@pytest.mark.slow
def test_domain_pretraining_with_adapters_under_a_lora_classifier(tmp_path, tokenizer):
    data = write_splits(tmp_path / "data", (10, 3, 3))
    dapt = DaptConfig(steps=4, window=16, batch_size=4, trainable="lora", lora_targets=("all",))
    config = tiny_config("classifier", init=base_checkpoint(tmp_path), dapt=dapt, **{**CLASSIFIER, "epochs": 1})
    adapted = pretrain_domain(data, tmp_path / "dapt", config, tokenizer=tokenizer)
    dapt_state = load_checkpoint(adapted.model_path)
    head_b = dapt_state["model"]["out_head.lora_B.head"]
    assert head_b.shape == (50257, 8) and 0 < int((head_b.abs().sum(1) > 0).sum()) < 50257  # the corpus's rows
    tuned = finetune(data, tmp_path / "clf", config.after_dapt(adapted.model_path), tokenizer=tokenizer)
    state = load_checkpoint(tuned.best)
    assert state["base"]["path"] == str(adapted.model_path.resolve())  # a LoRA model over a LoRA model
    assert open_model(tuned.best, CLASSIFIERS).classifier().model.n_classes == 3


def test_lora_needs_a_trained_model_and_the_books_recipe_is_its_scale(settings, capsys):
    import yaml

    from model.configs import ClassifierConfig, LoraConfigError
    from model.finetune_classifier import classifier_stage

    config = ClassifierConfig(trainable="lora")  # the pipeline's recipe names no init: it sets the model it built
    with pytest.raises(LoraConfigError, match="trainable lora adapts a trained model: set init to gpt2:<preset>"):
        classifier_stage(settings.home / "data", config)
    assert main(["finetune-instructions", "--trainable", "lora"]) == 2
    assert capsys.readouterr().err.count("trainable lora adapts a trained model") == 1
    dapt = ClassifierConfig(dapt=DaptConfig(trainable="lora"), trainable="lora")
    with pytest.raises(LoraConfigError, match="^dapt.trainable lora adapts"):
        dapt.check_lora()

    # appendix E in our terms: the book's update scale of 16 (alpha alone) is alpha 256 over rank 16
    recipe = ClassifierConfig(**yaml.safe_load((REPO / "configs" / "spam-lora-gpt2.yaml").read_text()))
    assert recipe.lora_spec() == LoraSpec(rank=16, alpha=256, dropout=0.0, targets=("all",))
    assert recipe.lora_spec().scale == 16 and recipe.init == "gpt2:gpt2-small"
