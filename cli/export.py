"""`gptflow export CHECKPOINT [--int8] [--format onnx|hf]`: a classifier or a language model to its edge bundle
(or a Hugging Face folder)."""

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
        "predictions. A language model (pretrained, converted GPT-2 or "
        "instruction-tuned model.pt): one ONNX decoder with a KV cache, parity over a left-padded prompt pass and "
        "32 cached steps, validation perplexity fp32 vs int8 (fails above --max-ppl-increase percent) and greedy "
        "agreement on the test prompts; --format hf writes a Hugging Face GPT-2 folder instead.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="classifier best.pt or LM model.pt, or their folder")
    p.add_argument(
        "--data",
        help="classifier: data folder with test.csv (default: the one it was tuned on); language model: an "
        "instructions data folder or a corpus folder with val.bin (default for instruction models: "
        "<home>/data/instructions)",
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
    if opened.kind in ("lm", "instruct"):
        return _export_lm(args, config, opened.style)
    if config.format == "hf":
        raise GptflowError(
            f"{opened.path} is not a language-model checkpoint: --format hf writes GPT-2 language models"
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


def _export_lm(args: argparse.Namespace, config, style: str | None) -> int:
    from flows.export import export_hf_flow, export_lm_flow
    from model.lm_export import model_rows

    if config.format == "hf":
        report = export_hf_flow(args.checkpoint, args.out, force=args.force)
        print(f"{'reused' if report['reused'] else 'wrote'} Hugging Face GPT-2 folder: {report['folder']}")
        print("  (transformers: GPT2LMHeadModel.from_pretrained(folder); GPT2Tokenizer.from_pretrained(folder))")
        return 0
    data_dir = Path(args.data) if args.data else _default_lm_data(style)
    report = export_lm_flow(args.checkpoint, str(data_dir), config, args.out, force=args.force)
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


def _default_lm_data(style: str | None) -> Path:
    """An instruction model's default data: the book's instructions folder, when it was prepared."""
    from gptflow.settings import get_settings

    folder = get_settings().home / "data" / "instructions"
    if style and (folder / "validation.json").is_file():
        return folder
    raise GptflowError(
        "--data: give the folder to measure perplexity and int8 agreement on: an instructions data folder "
        "(validation.json, test.json) or a corpus folder (val.bin)"
    )
