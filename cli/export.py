"""`gptflow export CHECKPOINT [--int8] [--format onnx|hf|gguf|peft] [--quant f16|q8_0|q4_0]`: a classifier or a
language model (GPT-2, Llama, Qwen3) to its edge bundle (or a Hugging Face folder, a GGUF bundle for llama.cpp and
Ollama, or a LoRA model's adapters as a peft adapter folder)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import prechecks
from cli.common import VerbConfig, add_folder_options, stage_config, table
from gptflow.errors import GptflowError


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "export",
        help="export a classifier or a language model to ONNX (+ int8) and write its edge bundle",
        description="A classifier: fp32 parity with PyTorch and int8 agreement on the whole test split; fails when "
        "int8 loses more than --max-int8-drop accuracy points or changes more than --max-int8-drop percent of the "
        "predictions. A language model of any family (GPT-2, Llama, Qwen3: pretrained, converted with load-gpt2 or "
        "load-hf, or instruction-tuned model.pt): one ONNX decoder with a KV cache, parity over a left-padded prompt "
        "pass and 32 cached steps (no data needed), and with --int8 validation perplexity fp32 vs int8 (fails above "
        "--max-ppl-increase percent) and greedy agreement on the test prompts, on --data encoded with the model's "
        "own tokenizer; --format hf writes a Hugging Face folder of the model's family instead, --format gguf a GGUF "
        "bundle (model.gguf at --quant, a Modelfile) for llama.cpp and Ollama, --format peft a LoRA checkpoint's "
        "adapters as a peft adapter folder for the Hugging Face export of its base.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="classifier best.pt or LM model.pt, or their folder")
    p.add_argument(
        "--data",
        help="classifier: data folder with test.csv (default: the one it was tuned on); language model: an "
        "instructions data folder or a corpus folder with val.bin to measure perplexity on (needed by --int8 only; "
        "default with --int8: the data the checkpoint records, else for instruction models <home>/data/instructions)",
    )
    add_folder_options(p, "export/<checkpoint folder>-<key>", resumable=False)
    p.set_defaults(
        handler=run_export,
        stage=VerbConfig("model.configs:ExportConfig", {"int8": False}),
        precheck=_check_export,
    )


def _check_export(args: argparse.Namespace) -> None:
    """CHECKPOINT's zip directory, and --data is a folder (before PyTorch or any flow is imported)."""
    prechecks.export_checkpoint(args.checkpoint)
    if args.data is not None and not Path(args.data).is_dir():
        raise GptflowError(
            f"--data: {args.data} is not a folder (expected a data folder: test.csv for a classifier; "
            "validation.json and test.json, or val.bin, for a language model)"
        )


def run_export(args: argparse.Namespace) -> int:
    from model.files import EXPORTABLE
    from model.opener import open_model

    config = stage_config(args)
    opened = open_model(args.checkpoint, EXPORTABLE)  # neither kind: one line before the flow
    if config.format == "peft":
        from model.peft_export import check_exportable

        check_exportable(opened)  # a classifier or whole weights: one line that says what to export instead
    if opened.kind in ("lm", "instruct"):
        return _export_lm(args, config, opened)
    if config.format != "onnx":
        raise GptflowError(
            f"{opened.path} is not a language-model checkpoint: --format {config.format} writes language models"
        )
    loaded = opened.classifier()
    data_dir = args.data or loaded.data_dir
    if not data_dir or not (Path(data_dir) / "test.csv").is_file():
        raise GptflowError(f"--data: no test.csv in {data_dir}; pass the data folder the classifier was tuned on")

    from flows.export import export_flow

    report = export_flow(str(loaded.path), str(data_dir), config, args.out, force=args.force)
    print(table([{"model": name, "test accuracy": f"{100 * acc:.2f}%"} for name, acc in report["accuracy"].items()]))
    p = report["parity"]
    print(
        f"parity: max |logit diff| {p['fp32_max_abs_logit_diff']:.2e}, "
        f"{p['fp32_prediction_matches']}/{p['n']} predictions equal"
        + (f", int8 agreement {100 * p['int8_agreement']:.2f}%" if "int8_agreement" in p else "")
    )
    print(table([{"file": name, "MB": f"{size / 1e6:.1f}"} for name, size in report["sizes_bytes"].items()]))
    print(f'bundle: {report["bundle"]}  (run: python -m edge classify {report["bundle"]} "text")')
    return 0


def _export_lm(args: argparse.Namespace, config, opened) -> int:
    from flows.export import export_gguf_flow, export_hf_flow, export_lm_flow, export_peft_flow
    from model.lm_export import lm_data_dir, model_rows

    if config.format == "gguf":
        report = export_gguf_flow(args.checkpoint, config, args.out, force=args.force)
        types = ", ".join(f"{n} {name}" for name, n in sorted(report["tensor_types"].items()))
        print(
            f"{'reused' if report['reused'] else 'wrote'} {report['family']} GGUF ({report['quant']}, "
            f"{report['sizes_bytes']['model.gguf'] / 1e6:.1f} MB; tensors {types}): {report['gguf']}"
        )
        print(
            f"bundle: {report['bundle']}  (Ollama: gptflow publish NAME {report['bundle']}; llama.cpp: llama-cli -m "
            f"{report['gguf']})"
        )
        return 0
    if config.format == "hf":
        report = export_hf_flow(args.checkpoint, args.out, force=args.force)
        architecture = report.get("architecture", "GPT2LMHeadModel")
        print(f"{'reused' if report['reused'] else 'wrote'} Hugging Face {architecture} folder: {report['folder']}")
        print("  (transformers: AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder))")
        return 0
    if config.format == "peft":
        from model.peft_export import PEFT_HINT

        report = export_peft_flow(args.checkpoint, args.out, force=args.force)
        print(
            f"{'reused' if report['reused'] else 'wrote'} peft adapter (rank {report['rank']}, modules "
            f"{', '.join(report['target_modules'])}): {report['folder']}"
        )
        print(f"  ({PEFT_HINT.format(folder=report['folder'])})")
        return 0
    data_dir = lm_data_dir(opened, args.data, config.int8)  # int8 without data: one line before the flow
    report = export_lm_flow(args.checkpoint, str(data_dir) if data_dir else None, config, args.out, force=args.force)
    q = report["quality"]
    print(table(model_rows(report)))
    p = q["parity"]
    print(
        f"parity: max |logit diff| prompt pass {p['prompt_max_abs_logit_diff']:.2e}, "
        f"{p['steps']} cached steps {p['steps_max_abs_logit_diff']:.2e}"
    )
    if "int8_agreement" in q:
        a = q["int8_agreement"]
        print(
            f"int8: perplexity {q['int8_perplexity_increase_pct']:+.2f}% (allowed {config.max_ppl_increase:g}%), "
            f"greedy-token agreement {100 * a['token_agreement']:.2f}%, identical continuations "
            f"{100 * a['identical_continuations']:.1f}%"
        )
    print(f'bundle: {report["bundle"]}  (run: python -m edge generate {report["bundle"]} "instruction")')
    return 0
