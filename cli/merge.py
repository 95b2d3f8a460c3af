"""`gptflow merge CHECKPOINT`: a LoRA checkpoint as a plain one, its adapters folded into the base's weights."""

from __future__ import annotations

import argparse

from cli import prechecks
from cli.common import add_folder_options


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "merge",
        help="fold a LoRA checkpoint's adapters into its base: a plain checkpoint that needs no base",
        description="CHECKPOINT is a LoRA fine-tune's model.pt (instruction tuning, domain pretraining) or best.pt "
        "(a classifier): its adapters (and a classifier's head) with the sha256 and path of the base they adapt. The "
        "base is checked, the adapters are folded into its weights (W + alpha/rank x B A), and the result is written "
        "as an ordinary model.pt or best.pt with the same prompt style, tokenizer and labels. Every verb reads LoRA "
        "checkpoints as they are (export, classify, generate, inspect merge on the way); merge keeps a model "
        "without its base.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a LoRA model.pt or best.pt, or its folder")
    add_folder_options(p, "merge/<checkpoint folder>-<key>", resumable=False)
    p.set_defaults(handler=run_merge, precheck=lambda args: prechecks.export_checkpoint(args.checkpoint))


def run_merge(args: argparse.Namespace) -> int:
    from flows.merge import merge_flow

    report = merge_flow(args.checkpoint, args.out, force=args.force)
    lora = report["lora"]
    print(
        f"{'reused' if report['reused'] else 'wrote'} merged {report['kind']} checkpoint (LoRA rank {lora['rank']}, "
        f"alpha {lora['alpha']:g}, {' '.join(lora['targets'])} on {report['base']}): {report['merged']}"
    )
    return 0
