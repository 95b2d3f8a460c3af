"""`gptflow pretrain`, `gptflow load-gpt2 NAME|PATH`, `gptflow load-hf NAME|FOLDER` and `gptflow generate PROMPT
--model PATH`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import prechecks
from cli.common import VerbConfig, add_folder_options, stage_config, table
from edge.options import add_generation_options, positive_int


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "pretrain",
        help="pretrain a GPT preset on a corpus (checkpoints, resume, loss curve)",
        description="Tokenize the corpus if needed (data stage), then pretrain. Rerunning the same command "
        "resumes from the last checkpoint; a finished run is reused.",
    )
    p.add_argument(
        "--corpus",
        default="tinyshakespeare",
        help="the-verdict, tinyshakespeare, a UTF-8 text file, or a folder with train.bin/val.bin",
    )
    p.add_argument("--list-presets", action="store_true", help="print the model presets and exit")
    add_folder_options(p, "pretrain/<corpus>-<preset>-<key>")
    p.set_defaults(handler=run_pretrain, stage=VerbConfig("model.configs:PretrainConfig"), precheck=_check_pretrain)

    p = verbs.add_parser(
        "load-gpt2",
        help="convert public GPT-2 weights to a gptflow checkpoint",
        description="NAME: gpt2-small|gpt2-medium|gpt2-large|gpt2-xl (downloaded from Hugging "
        "Face, or read from GPTFLOW_MIRROR); PATH: a model.safetensors or a folder holding one.",
    )
    p.add_argument("source", metavar="NAME|PATH")
    p.set_defaults(handler=run_load_gpt2, precheck=lambda args: prechecks.gpt2_weights(args.source))

    p = verbs.add_parser(
        "load-hf",
        help="convert a Hugging Face model (GPT-2, Llama family, Qwen3) to a gptflow checkpoint",
        description="NAME: a Hugging Face repo (HuggingFaceTB/SmolLM2-135M-Instruct, Qwen/Qwen3-0.6B, distilgpt2, "
        "...; fetched file by file, or read from GPTFLOW_MIRROR; HF_TOKEN is sent for gated repos); FOLDER: a "
        "model folder with config.json, safetensors weights and tokenizer.json.",
    )
    p.add_argument("source", metavar="NAME|FOLDER")
    p.add_argument("--keep-dtype", action="store_true", help="keep bf16/fp16 weights as they are (default: fp32)")
    p.set_defaults(handler=run_load_hf, precheck=lambda args: prechecks.hf_model(args.source))

    p = verbs.add_parser(
        "generate",
        help="continue a prompt, or answer an instruction, with a trained model",
        description="Greedy by default; --temperature > 0 samples (with --top-k/--top-p). An instruction-tuned "
        "checkpoint applies its prompt template (Alpaca or Phi-3), a model with a chat template (SmolLM, Qwen3, "
        "Llama 3.2 Instruct) its own, and prints the response; --raw continues the text as it is.",
    )
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument(
        "--model",
        required=True,
        help="a gptflow checkpoint (.pt, or a folder with model.pt), a GPT-2 preset or a .safetensors",
    )
    add_generation_options(p, max_new_tokens=50)
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: PyTorch's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.set_defaults(handler=run_generate, precheck=lambda args: prechecks.language_model(args.model))


def _check_pretrain(args: argparse.Namespace) -> None:
    if not args.list_presets:
        prechecks.corpus("--corpus", args.corpus, token_folder=True)


def run_pretrain(args: argparse.Namespace) -> int:
    if args.list_presets:
        from model.config import PRESETS

        print(
            table(
                [
                    {
                        "preset": name,
                        "family": c.family,
                        "emb": c.emb_dim,
                        "layers": c.n_layers,
                        "heads": c.n_heads,
                        "kv heads": c.kv_heads,
                        "context": c.context_length,
                        "params": f"{c.n_params() / 1e6:.1f}M",
                    }
                    for name, c in PRESETS.items()
                ]
            )
        )
        return 0
    config = stage_config(args)

    from flows.pretrain import pretrain_flow

    out = pretrain_flow(args.corpus, config, out_dir=args.out, resume=args.resume, force=args.force)
    m = out["metrics"]
    print(
        f"{'reused' if out['reused'] else 'trained'} {config.preset}: {m['steps']} steps, "
        f"val loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.1f})"
    )
    print(f"model: {out['model']}")
    print(f"checkpoint: {out['checkpoint']}")
    print(f"loss curve: {Path(out['out_dir']) / 'loss_curve.png'}")
    return 0


def run_load_gpt2(args: argparse.Namespace) -> int:
    from model.weights import resolve_weights

    resolve_weights(args.source)  # bad name/path or missing mirror file: one-line error before the flow

    from flows.pretrain import load_gpt2_flow

    out = load_gpt2_flow(args.source)
    print(f"{'reused' if out['reused'] else 'converted'} {args.source}")
    print(f"model: {out['model']}")
    return 0


def run_load_hf(args: argparse.Namespace) -> int:
    from flows.pretrain import load_hf_flow

    out = load_hf_flow(args.source, args.keep_dtype)
    print(f"{'reused' if out['reused'] else 'converted'} {args.source}")
    print(f"model: {out['model']}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from edge.options import fit_context
    from gptflow.errors import GptflowError
    from gptflow.prompts import CHAT
    from model.device import resolve_device
    from model.files import LANGUAGE_MODELS
    from model.generate import NonFiniteLogitsError, generate, trim_at_eos
    from model.instruct import prompt_ids
    from model.opener import open_model
    from model.training import set_threads

    set_threads(args.threads)
    device = resolve_device(args.device)
    opened = open_model(args.model, LANGUAGE_MODELS)
    model, style, tok = opened.language_model().to(device), opened.style, opened.tokenizer()
    chat = tok.chat_template is not None and not style and not args.raw
    if style and not args.raw:  # asked as it was fine-tuned: its text prompt, or its chat template (style chat)
        prompt = args.prompt
        ids = prompt_ids(tok, {"instruction": args.prompt, "input": args.input or ""}, style)
    elif chat:  # the model's own chat template, as transformers renders it
        prompt = args.prompt + (f"\n\n{args.input}" if args.input else "")
        ids = tok.encode(tok.render_chat([{"role": "user", "content": prompt}]))
    else:
        prompt = args.prompt + (f"\n{args.input}" if args.input else "")
        ids = tok.encode(prompt, add_special_tokens=True)
    try:
        ids = fit_context(ids or [tok.eos_id], model.cfg.context_length, args.truncate)
        out = generate(
            model,
            torch.tensor([ids], device=device),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=tok.eos_ids,
            seed=args.seed,
            use_cache=args.use_cache,
        )
    except NonFiniteLogitsError as exc:
        raise GptflowError(f"{opened.path}: {exc}") from None
    except ValueError as exc:
        raise GptflowError(str(exc)) from None
    new = trim_at_eos(out[0, len(ids) :].tolist(), tok.eos_ids)
    if (style or chat) and not args.raw:
        # the response alone, as `python -m edge generate` prints it
        sys.stdout.write(tok.decode(new, skip_special_tokens=style == CHAT) + "\n")
    else:
        sys.stdout.write(prompt + tok.decode(new) + "\n")
    return 0
