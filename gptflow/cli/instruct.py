"""`gptflow finetune-instructions`: fine-tune on instruction data and answer its test split."""

from __future__ import annotations

import argparse
from pathlib import Path

FIELDS = ["init", "preset", "context_length", "style", "mask_prompt", "max_length", "epochs", "max_steps",
          "batch_size", "lr", "weight_decay", "warmup_steps", "seed", "bf16", "threads", "eval_every",
          "checkpoint_every", "max_new_tokens", "temperature", "max_test_entries"]


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "finetune-instructions", help="instruction fine-tuning (Alpaca or Phi-3 prompts) and test responses",
        description="Prepare the instruction data if needed, fine-tune, then write the test entries with a "
        "model_response field (the input of `gptflow evaluate`). Rerunning the same command resumes training "
        "and response generation where they stopped; a finished run is reused.",
    )
    p.add_argument("--data", help="a JSON list of {instruction, input, output} (split by the data stage) or a "
                   "folder with train/validation/test.json (default: the book's instruction-data.json)")
    p.add_argument("--init", help="checkpoint:PATH (our pretraining or load-gpt2 output), gpt2:NAME|PATH "
                   "(e.g. gpt2:gpt2-medium, the book's) or random (default)")
    p.add_argument("--preset", help="model shape for --init random (default mini)")
    p.add_argument("--context-length", type=int, help="override the preset's context (--init random)")
    p.add_argument("--style", choices=["alpaca", "phi3"], help="prompt format (default alpaca)")
    p.add_argument("--mask-prompt", action="store_true", default=None, help="loss on the response tokens only")
    p.add_argument("--max-length", type=int, help="truncate examples to this many tokens (default: context)")
    p.add_argument("--epochs", type=int, help="default 2 (the book)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="train in fp32")
    p.add_argument("--threads", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--max-new-tokens", type=int, help="response length limit (default 256)")
    p.add_argument("--temperature", type=float, help="0 (default): greedy")
    p.add_argument("--max-test-entries", type=int, help="answer only the first N test entries")
    p.add_argument("--out", help="output folder (default GPTFLOW_HOME/instruct/<data>-<init>-<style>-<hash>)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint")
    p.set_defaults(handler=run_finetune_instructions)


def run_finetune_instructions(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from model.config import GPTConfig, ModelConfigError
    from model.init import init_file
    from model.instruct import InstructConfig, InstructError

    values = {f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None}
    try:
        config = InstructConfig(**values)
        if config.init == "random":
            GPTConfig.from_preset(config.preset)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InstructError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    except ModelConfigError as exc:
        raise InstructError(f"--preset: {exc}") from None
    if args.data is not None and not Path(args.data).exists():
        raise InstructError(f"--data {args.data}: no such file or folder (expected a JSON list of "
                            "{instruction, input, output} or a folder with train/validation/test.json)")
    if config.init.startswith("checkpoint:"):
        init_file(config.init)  # a missing checkpoint: one line before any flow starts

    from flows.instruct import finetune_instructions

    out = finetune_instructions(args.data, config, out_dir=args.out, resume=args.resume)
    m = out["metrics"]
    print(f"{'reused' if out['reused'] else 'trained'} {config.init_label()} ({config.style}): {m['steps']} steps, "
          f"train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}")
    print(f"model: {out['model']}")
    print(f"checkpoint: {out['checkpoint']}")
    print(f"loss curve: {out['plot']}")
    print(f"responses: {out['responses']} ({out['entries']} test entries"
          f"{', reused' if out['responses_reused'] else ''})")
    return 0
