"""Fine-tuning and responses for every model family: a tiny random Hugging Face model of each (SmolLM-shaped Llama
with ChatML, Llama 3.2 with its template, Qwen3 with its thinking switch) starts an instruction fine-tune and a
classifier through `hf:<folder>`; the chat template renders the examples as transformers does, the loss covers the
assistant's turn only, a few steps lower it, and every checkpoint keeps the model's tokenizer for the verbs that
read it later (`generate`, `classify`). Last, the SmolLM2 recipe against a mirror laid out as the hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from classify_data import make_texts, write_splits
from conftest import tiny_config
from hf_fixtures import write_hub_mirror, write_tokenizer

from cli import main
from edge.text import encode_texts
from gptflow.chat_template import ChatTokenizer
from gptflow.prompts import CHAT, chat_prompt
from model.checkpoint import load_checkpoint
from model.configs import ClassifierConfig, InstructConfig
from model.files import CLASSIFIERS
from model.finetune_classifier import finetune as finetune_classifier
from model.fused_loss import IGNORE_INDEX
from model.init import InitSpec
from model.instruct import Batcher, encode_entries, finetune, generate_responses
from model.opener import open_model

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
FAMILIES = {"smollm": "chatml", "llama32": "llama3", "qwen3": "qwen3"}  # folder -> tokenizer style
ENTRIES = [
    {"instruction": f"What is {i} plus one?", "input": "" if i % 2 else f"Number: {i}", "output": f"It is {i + 1}."}
    for i in range(20)
]


def _tiny_model(name: str, vocab_size: int):
    """Each family's shape at width 64 and two layers (its distinguishing switches kept)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(sum(map(ord, name)))
    shared = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    shared.update(num_key_value_heads=2, intermediate_size=128)
    if name == "smollm":  # SmolLM's: tied head, grouped queries
        return LlamaForCausalLM(LlamaConfig(**shared, max_position_embeddings=256, tie_word_embeddings=True))
    if name == "llama32":  # Llama 3.2's rotary scaling and untied head
        scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16, "rope_theta": 500000.0}  # fmt: skip
        config = LlamaConfig(**shared, max_position_embeddings=256, tie_word_embeddings=False, rope_scaling=scaling)
        return LlamaForCausalLM(config)
    # Qwen3's q/k norms and a head wider than emb/heads
    return Qwen3ForCausalLM(Qwen3Config(**shared, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """A random-weight Hugging Face folder per family, written by transformers, with its tokenizer."""
    root = tmp_path_factory.mktemp("tiny-hf")
    folders = {}
    for name, style in FAMILIES.items():
        vocab = write_tokenizer(root / f"{name}-tokenizer", style).vocab_size
        _tiny_model(name, vocab).eval().save_pretrained(root / name)
        write_tokenizer(root / name, style)
        folders[name] = root / name
    return folders


@pytest.fixture
def instructions(tmp_path) -> Path:
    folder = tmp_path / "instructions"
    folder.mkdir()
    for name, part in {"train": ENTRIES[:8], "validation": ENTRIES[8:12], "test": ENTRIES[12:14]}.items():
        (folder / f"{name}.json").write_text(json.dumps(part))
    return folder


@pytest.mark.parametrize("name", FAMILIES)
def test_chat_examples_are_transformers_renders_with_the_assistant_turn_as_the_only_target(tiny_hf, name):
    """The prompt is transformers' `apply_chat_template(add_generation_prompt=True)` (Qwen3: non-thinking, so the
    empty think block ends the prompt), the ids are transformers' ids of the whole conversation up to the end of
    the assistant's turn, and the targets the loss reads are exactly the answer and its end-of-turn token."""
    from transformers import AutoTokenizer

    tok, theirs = ChatTokenizer.from_folder(tiny_hf[name]), AutoTokenizer.from_pretrained(tiny_hf[name])
    entries = [ENTRIES[0], ENTRIES[1]]  # with and without an input
    encoded = encode_entries(entries, tok, CHAT)
    for entry, (ids, n_prompt) in zip(entries, encoded):
        user = entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": entry["output"]}]
        prompt = theirs.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert chat_prompt(tok, entry) == prompt
        assert prompt.endswith("<think>\n\n</think>\n\n") == (name == "qwen3")
        whole = theirs(
            theirs.apply_chat_template(chat, tokenize=False, enable_thinking=False), add_special_tokens=False
        )
        assert (
            ids == whole["input_ids"][: len(ids)]
            and ids[:n_prompt] == theirs(prompt, add_special_tokens=False)["input_ids"]
        )
        assert ids[-1] in tok.eos_ids and tok.decode(ids[n_prompt:-1]) == entry["output"]
    batcher = Batcher.of(tok, CHAT, InstructConfig(), max_length=256)  # mask_prompt is off: chat masks it anyway
    inputs, targets = batcher(encoded)
    for row, (ids, n_prompt) in enumerate(encoded):
        kept = targets[row][targets[row] != IGNORE_INDEX].tolist()
        assert kept == ids[n_prompt:]  # the answer and its end of turn, nothing of the prompt or the padding
        assert inputs[row, len(ids) - 1 :].eq(batcher.pad_id).all()


def _losses(history) -> list[float]:
    return [h["loss"] for h in history if h["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_instruction_and_classifier_fine_tuning_lower_the_loss_and_keep_the_tokenizer(
    tiny_hf, name, instructions, tmp_path, settings, capsys
):
    """`hf:<folder>`: converted once, tuned in its chat template (loss on the answer only) for 8 steps, asked for
    the test responses in it; then a classifier on the same backbone (the book's recipe: the last block, the final
    norm and a new head train). Both losses fall; `model.pt`, `last.pt` and `best.pt` keep the tokenizer, which
    `generate` and `classify` use."""
    init = InitSpec(f"hf:{tiny_hf[name]}")
    files = init.tokenizer_files(settings)
    assert files["tokenizer.json"] == (tiny_hf[name] / "tokenizer.json").read_text()

    config = tiny_config("instruct", init=init, lr=3e-3, batch_size=4, epochs=4, eval_every=4, log_every=1)
    config = config.model_copy(update={"max_new_tokens": 6, "checkpoint_every": 4})
    result = finetune(instructions, tmp_path / "instruct", config)
    losses = _losses(result.history)
    with capsys.disabled():  # the measured numbers, in the log of a `-s` run
        print(f"\n{name}: instruction loss {losses[0]:.3f} -> {losses[-1]:.3f}", end=" ")
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0
    state = load_checkpoint(result.model_path)
    assert state["style"] == CHAT and state["tokenizer"] == files and result.metrics["style"] == CHAT
    assert load_checkpoint(result.checkpoint)["tokenizer"] == files
    assert open_model(result.model_path, ("instruct",)).tokenizer().chat_template is not None

    responses = generate_responses(result.model_path, instructions / "test.json", tmp_path / "responses", config)
    written = json.loads(responses.path.read_text())
    assert [e["instruction"] for e in written] == [e["instruction"] for e in ENTRIES[12:14]]
    manifest = json.loads((responses.path.parent / "manifest.json").read_text())
    assert manifest["metrics"]["style"] == CHAT and len(manifest["metrics"]["chat_template_sha256"]) == 64
    argv = ["generate", ENTRIES[12]["instruction"], "--input", ENTRIES[12]["input"], "--model", str(result.model_path)]
    assert main([*argv, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == written[0]["model_response"]  # the verb asks as the responses did

    data = write_splits(tmp_path / "topics", (12, 3, 3))
    config = ClassifierConfig(init=init, lr=2e-3, epochs=3, batch_size=6, eval_every=6, log_every=1, patience=None)
    tuned = finetune_classifier(data, tmp_path / "classify", config)
    losses = _losses(tuned.history)
    with capsys.disabled():
        print(f"classifier loss {losses[0]:.3f} -> {losses[-1]:.3f}", end=" ")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    cfg = open_model(tuned.best, CLASSIFIERS).config
    block = sum(p.numel() for p in _tiny_model(name, cfg.vocab_size).model.layers[-1].parameters())
    assert tuned.summary["trainable_params"] == block + cfg.emb_dim + cfg.emb_dim * 3 + 3  # block, norm, new head
    best = load_checkpoint(tuned.best)
    tok = ChatTokenizer.from_files(files)
    assert best["tokenizer"] == files and best["pad_id"] == tok.pad_id
    loaded = open_model(tuned.best, CLASSIFIERS).classifier()
    assert loaded.model.pad_id == tok.pad_id and loaded.tokenizer().files == files
    texts = make_texts(2, seed=9)["text"].tolist()
    assert encode_texts(loaded.tokenizer(), texts, 64) == [
        ids[:64] for ids in tok.encode_batch(texts, add_special_tokens=True)
    ]
    assert main(["classify", *texts, "--model", str(tuned.best)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [r[2] for r in rows] == texts and {r[0] for r in rows} <= {"billing", "food", "sport"}


@pytest.mark.slow
def test_domain_pretraining_reads_and_keeps_the_models_tokenizer(tiny_hf, tmp_path, settings):
    """DAPT from `hf:` (Qwen3): its corpus is the model's own ids with its eos after each text, its `model.pt` and
    `last.pt` keep the tokenizer, and the classifier fine-tuned from it keeps it too."""
    from model.configs import DaptConfig
    from model.finetune_classifier import pretrain_domain

    data = write_splits(tmp_path / "topics", (12, 3, 3))
    dapt = DaptConfig(steps=4, window=16, batch_size=4, warmup_steps=1)
    config = ClassifierConfig(init=f"hf:{tiny_hf['qwen3']}", dapt=dapt, epochs=1)
    files = config.init.tokenizer_files(settings)
    result = pretrain_domain(data, None, config)
    assert load_checkpoint(result.model_path)["tokenizer"] == files == load_checkpoint(result.checkpoint)["tokenizer"]
    tok = ChatTokenizer.from_files(files)
    assert result.metrics["corpus_tokens"] == sum(len(ids) + 1 for ids in tok.encode_batch(make_texts(12, 0)["text"]))
    tuned = finetune_classifier(data, None, config.after_dapt(result.model_path))
    assert load_checkpoint(tuned.best)["tokenizer"] == files


def test_hf_init_spec_and_gpt2_runs_keep_no_tokenizer(tiny_hf, settings, tokenizer):
    """`hf:` parses and names the folder; a model of GPT-2's vocabulary keeps no tokenizer and reads tiktoken's."""
    spec = InitSpec(f"hf:{tiny_hf['smollm']}")
    assert (spec.kind, spec.label("tiny")) == ("hf", "smollm")
    assert InitSpec(f"hf:{SMOLLM2}").label("tiny") == "SmolLM2-135M-Instruct"
    assert spec.file(settings) == settings.home / "models" / "smollm" / "model.pt"
    assert InitSpec("random").tokenizer_files(settings) is None
    gpt2 = InitSpec("random").tokenizer(settings, tokenizer)
    assert (gpt2.encoding is tokenizer, gpt2.pad_id, gpt2.chat_template) == (True, 50256, None)
    with pytest.raises(ValueError, match=r"\| hf:<repo-or-folder>"):
        InitSpec("hf:")


# --- the SmolLM2 recipe ---------------------------------------------------------------------------------


def test_the_smollm2_recipe_validates_as_pipeline_params():
    from flows.params import load_params

    params = load_params(REPO / "configs" / "smollm2.yaml")
    assert params.weights == f"hf:{SMOLLM2}" and params.weights_kind == "hf" and params.gpt2_source == SMOLLM2
    assert params.classifier.dapt is None and params.classifier.trainable == "last_k"
    assert params.instruct.max_steps and params.instruct.max_length
    assert "corpus" not in params.data_sources()  # nothing is pretrained


@pytest.mark.slow
def test_smollm2_recipe_runs_its_classify_and_instruct_stages_from_a_hub_mirror(
    tiny_hf, prefect_harness, mirror, tmp_path, monkeypatch
):
    """`pipeline` with configs/smollm2.yaml (its stages cut to a few steps) and a mirror holding a tiny random
    SmolLM-shaped model under SmolLM2's hub name: the base model is that model converted, the classifier and the
    instruction model are fine-tuned from it with its own tokenizer and chat template, the judge is skipped (no
    server), and every later stage runs for real: the classifier's edge bundle and the LM bundle carry the model's
    tokenizer files (before: the classifier export read its test split with GPT-2's BPE, ids beyond the model's
    vocabulary, IndexError), and both models are inspected."""
    import flows.pipeline
    from flows.params import load_params
    from gptflow.settings import get_settings

    hub = tmp_path / "mirror"
    hub.mkdir()
    for host in mirror.iterdir():  # the shared mirror's data, and the hub beside it
        if host.is_dir():
            (hub / host.name).symlink_to(host)
    write_hub_mirror(hub, SMOLLM2, tiny_hf["smollm"])
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GPTFLOW_MIRROR", str(hub))
    get_settings.cache_clear()
    try:
        params = load_params(REPO / "configs" / "smollm2.yaml").merged(
            {
                "classifier": {"epochs": 1, "max_length": 32},
                "instruct": {"max_steps": 2, "batch_size": 2, "max_new_tokens": 4, "max_test_entries": 2},
                "judge": {"host": "http://127.0.0.1:9", "retries": 0},
                "promotion": {"enabled": False},
            }
        )
        summary = flows.pipeline.pipeline(params)
    finally:
        get_settings.cache_clear()
    status = {row["stage"]: row for row in summary["stages"]}
    base = tmp_path / "home/models/HuggingFaceTB--SmolLM2-135M-Instruct"
    assert status["base-model"]["status"] == "done" and (base / "model.pt").is_file()
    files = load_checkpoint(base / "model.pt")["tokenizer"]
    deliverables = {k: Path(v) for k, v in summary["deliverables"].items()}
    best = load_checkpoint(deliverables["classifier checkpoint"])
    assert best["tokenizer"] == files and best["pad_id"] == ChatTokenizer.from_files(files).pad_id
    model = deliverables["instruction model"]
    assert re.fullmatch(r"instructions-HuggingFaceTB--SmolLM2-135M-Instruct-chat-[0-9a-f]{8}", model.parent.name)
    assert load_checkpoint(model)["style"] == CHAT and load_checkpoint(model)["tokenizer"] == files
    responses = json.loads(deliverables["test responses"].read_text())
    assert len(responses) == 2 and all(isinstance(r["model_response"], str) for r in responses)
    assert status["evaluate"]["status"] == "skipped"

    from edge.runtime import EdgeClassifier, verify_bundle

    assert all(status[s]["status"] == "done" for s in ("export", "export-lm", "inspect-base", "inspect-instruct"))
    kept = sorted(name for name in files if "/" not in name)
    manifest = verify_bundle(deliverables["edge bundle"], "classifier")
    assert manifest["tokenizer"] == "hf" and manifest["tokenizer_files"] == kept
    assert "encoder.json" not in manifest["files"]
    assert manifest["pad_id"] == best["pad_id"] and {"model.onnx", "model.int8.onnx", *kept} <= set(manifest["files"])
    report = json.loads((deliverables["edge bundle"].parent / "export_report.json").read_text())
    assert report["parity"]["fp32_max_abs_logit_diff"] <= 1e-4 and report["parity"]["int8_agreement"] >= 0.99
    labels = [label for label, _ in EdgeClassifier(deliverables["edge bundle"], int8=True).predict(["Win a prize!"])]
    assert labels[0] in ("ham", "spam")
    lm_manifest = verify_bundle(deliverables["LM edge bundle"], "lm")
    assert lm_manifest["tokenizer"] == "hf" and lm_manifest["prompt"]["style"] == CHAT
    for name in ("base model inspection", "instruction model inspection"):
        assert deliverables[name].is_file()
