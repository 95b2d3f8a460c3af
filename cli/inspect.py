"""`gptflow inspect MODEL TEXT`: look inside a checkpoint on one probe text."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import prechecks
from cli.common import VerbConfig, add_folder_options, stage_config, table


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "inspect",
        help="look inside a model on a probe text: tokens, forward trace, attention, logit lens, embeddings",
        description="Writes report.md, PNG figures and report.json: the token table, a trace of block 0 and the "
        "last block (shapes, first values), attention heatmaps per layer (heads as tiles) and one large map for "
        "--layer/--head, the next-token top-k and a logit lens after every block, token embeddings in 2-D (a word "
        "list; the probe shuffled, with and without positions), and how temperature, top-k and top-p reshape the "
        "next-token distribution. A classifier checkpoint shows its backbone and class probabilities. Any family: "
        "GPT-2, and Llama-family or Qwen3 models converted with load-hf (read with their own tokenizer; rotary "
        "models have no position embeddings, grouped-query heads name their key/value head).",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a gptflow checkpoint (model.pt, a classifier's best.pt, or their folder; load-hf converts a Hugging "
        "Face model of any family), a GPT-2 preset or a .safetensors file",
    )
    p.add_argument("text", metavar="TEXT", help="the probe text")
    add_folder_options(p, "inspect/<model>-<key>")
    p.set_defaults(
        handler=run_inspect,
        stage=VerbConfig("model.configs:InspectConfig"),
        precheck=lambda args: prechecks.any_model(args.model),
    )


def run_inspect(args: argparse.Namespace) -> int:
    from model.introspect import check_request, open_subject

    config = stage_config(args)
    opened = open_subject(args.model)  # a file that is no model, a bad probe or layer: one line before the flow starts
    check_request(opened.config, args.text, config, opened.tokenizer())

    from flows.inspect import inspect_flow

    out = inspect_flow(args.model, args.text, config, out_dir=args.out, resume=args.resume, force=args.force)
    print(f"{'reused' if out['reused'] else 'inspected'} {out['checkpoint']} ({out['kind']})")
    print(table([{"metric": k, "value": v} for k, v in out["metrics"].items()]))
    print(f"report: {out['report']}")
    print(f"figures: {Path(out['out_dir'])}/*.png ({len(out['figures'])})")
    return 0
