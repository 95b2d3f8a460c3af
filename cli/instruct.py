"""`gptflow finetune-instructions`: fine-tune on instruction data and answer its test split."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import prechecks
from cli.common import VerbConfig, add_folder_options, check_init, stage_config
from gptflow.errors import GptflowError
from gptflow.splits import INSTRUCTION_FILES


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "finetune-instructions",
        help="instruction fine-tuning (Alpaca or Phi-3 prompts) and test responses",
        description="Prepare the instruction data if needed, fine-tune, then write the test entries with a "
        "model_response field (the input of `gptflow evaluate`). Rerunning the same command resumes training "
        "and response generation where they stopped; a finished run is reused.",
    )
    p.add_argument(
        "--data",
        help="a JSON list of {instruction, input, output} (split by the data stage) or a "
        "folder with train/validation/test.json (default: the book's instruction-data.json)",
    )
    add_folder_options(p, "instruct/<data>-<init>-<style>-<key>")
    p.set_defaults(
        handler=run_finetune_instructions, stage=VerbConfig("model.configs:InstructConfig"), precheck=_check_data
    )


def _check_data(args: argparse.Namespace) -> None:
    """--data: an instruction file the data stage accepts, or a folder with the three splits (flows.instruct)."""
    if args.data is None:
        return
    data = Path(args.data)
    if not data.exists():
        raise GptflowError(
            f"--data {args.data}: no such file or folder (expected a JSON list of "
            "{instruction, input, output} or a folder with train/validation/test.json)"
        )
    if data.is_dir():
        missing = [name for name in INSTRUCTION_FILES if not (data / name).is_file()]
        if missing:
            raise GptflowError(
                f"--data {args.data}: a folder without {', '.join(missing)} (expected a folder with "
                "train/validation/test.json or a JSON list of {instruction, input, output})"
            )
    else:
        prechecks.instructions("--data", args.data)


def run_finetune_instructions(args: argparse.Namespace) -> int:
    config = stage_config(args)
    check_init(config.init)
    config.check_lora()

    from flows.instruct import finetune_instructions

    out = finetune_instructions(args.data, config, out_dir=args.out, resume=args.resume, force=args.force)
    m = out["metrics"]
    print(
        f"{'reused' if out['reused'] else 'trained'} {config.init.label(config.preset)} "
        f"({m.get('style') or config.style}): "
        f"{m['steps']} steps, train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}"
        + (
            f"; LoRA rank {m['lora']['rank']} on {' '.join(m['lora']['targets'])}: "
            f"{m['trainable_params']:,} trainable parameters"
            if m.get("lora")
            else ""
        )
    )
    print(f"model: {out['model']}")
    print(f"checkpoint: {out['checkpoint']}")
    print(f"loss curve: {out['plot']}")
    print(
        f"responses: {out['responses']} ({out['entries']} test entries{', reused' if out['responses_reused'] else ''})"
    )
    return 0
