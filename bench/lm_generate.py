"""Language-model generation speed on the CPU, greedy, from one set of weights: our PyTorch loop without and with
the KV cache, the exported ONNX decoder (fp32 and weight-only int8) run by edge.lm, Hugging Face transformers, and
llama.cpp (llama-cpp-python) on GGUF files of our writer.

    .venv/bin/python -m bench.lm_generate [--preset gpt2-small | --checkpoint MODEL.pt] [--threads 2] [--repeats 1]
        [--engines torch-nocache,torch-kv,onnx-fp32,onnx-int8,transformers,llamacpp-f16,llamacpp-q8_0,llamacpp-q4_0]
        [--batches 1,8] [--warmup-tokens N] [--prompt-tokens 64] [--new-tokens 128] [--work DIR] [--json FILE]

Engines: torch-nocache / torch-kv = `model.generate.generate(use_cache=False / True)`, fp32; onnx-fp32 / onnx-int8
= `edge.lm.Decoder.generate` on `model.lm_export.export_decoder` / `quantize_decoder`; transformers =
`GPT2LMHeadModel.from_pretrained` on the folder `model.hf_export.save_hf_model` wrote, `generate(do_sample=False,
use_cache=True, min_new_tokens = max_new_tokens)`; llamacpp-f16 / -q8_0 / -q4_0 = `llama_cpp.Llama` on the GGUF
`model.gguf_file.write_gguf` wrote in that type (n_threads and n_threads_batch = --threads; llama-cpp-python's
defaults otherwise: f16 KV cache, no flash attention), driven token by token: `Llama.eval` of the prompt, then of
each new token, the argmax of the last logits picking the next (what llama.cpp's greedy sampler, `generate(temp=0.0)`,
picks, without its per-token sampler chain). Every engine generates exactly --new-tokens tokens per row (eos_id
None) after a prompt of --prompt-tokens random token ids, at batch 1 and at batch 8 (8 such prompts); the llama.cpp
engines run batch 1 only (llama-cpp-python decodes one sequence) and say so for the others. The default --engines
leaves them out: they need llama-cpp-python (`make llama-cpp`).
The GGUF's vocabulary is GPT-2's BPE (GPTFLOW_MIRROR or the network): cut to a smaller vocab_size (merges kept only
where both parts and the result are kept, `<|endoftext|>` moved to the last id) or padded with UNUSED `[PADn]` rows;
the bench feeds token ids, so the texts do not matter.

Per run: tok/s = all new tokens of the batch over the whole generate call; TTFT = the prompt pass and the first
token, from the call's start to the moment the first token exists; steady tok/s = the remaining tokens over the
time from the first token to the last (per-token time stamps: a forward hook on our model, edge.lm's on_step, a
transformers streamer, after each argmax for llama.cpp). One warm-up run per engine and batch (--warmup-tokens new
tokens, default all), then --repeats timed runs (medians reported). torch-nocache is slow at gpt2-small shapes
(minutes per batch-8 run): `--engines torch-nocache,torch-kv --batches 1` measures it alone.
Files: the size of each engine's file (ONNX fp32 and int8, every GGUF, transformers' safetensors) and the time
it took to write.
Random weights (--preset) come from torch.manual_seed(0) with GPT-2 init. The 2 cores are shared with other
work: timings are noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.data_parallel import cpu_model, usable_cores
from bench.edge import state_size
from bench.llamacpp_engine import (
    bench_vocabulary,
    llama_cpp_module,
    llamacpp_runner,
    llamacpp_teacher_forced,
    open_llama,
    write_engine_gguf,
)
from bench.lm_engines import (
    first_divergence,
    match_rate,
    measure,
    onnx_runner,
    teacher_forced,
    torch_runner,
    transformers_runner,
    versions,
)
from edge.lm import Decoder
from edge.text import EOT_ID
from model.config import GPTConfig
from model.files import CHECKPOINT_LMS
from model.gpt import GPTModel
from model.hf_export import save_hf_model
from model.lm_export import export_decoder
from model.opener import open_model
from model.quantize import quantize_decoder
from model.training import set_threads

# Table order. llama.cpp's engines are not in the default --engines: they need llama-cpp-python (`make llama-cpp`).
LLAMACPP = {"llamacpp-f16": "f16", "llamacpp-q8_0": "q8_0", "llamacpp-q4_0": "q4_0"}  # engine -> GGUF type
ENGINES = ("torch-nocache", "torch-kv", "onnx-fp32", "onnx-int8", "transformers", *LLAMACPP)
DEFAULT_ENGINES = tuple(e for e in ENGINES if e not in LLAMACPP)
BASELINE = "torch-kv"
BATCHES = (1, 8)
# The targets, defined at GPT-2 small shapes and 2 threads.
TARGET_INT8_SPEEDUP = 2.5  # onnx-int8 batch-1 tok/s over torch-kv
TARGET_INT8_SIZE = 0.27  # int8 file over fp32 file


def engine_file_key(engine: str) -> str:
    """The key of `sizes` holding the size of what `engine` loads."""
    if engine in LLAMACPP:
        return f"gguf_{LLAMACPP[engine]}_mb"
    return {"onnx-fp32": "onnx_fp32_mb", "onnx-int8": "onnx_int8_mb", "transformers": "hf_safetensors_mb"}.get(
        engine, "torch_state_mb"
    )


def check_results(
    tokens: dict[tuple[str, int], np.ndarray],
    by_key: dict[tuple[str, int], dict[str, Any]],
    sizes: dict[str, float],
    batches: list[int],
    llama_engines: list[str],
    int8_teacher: dict[int, float],
    llama_teacher: dict[str, float],
    at_target_shape: bool,
) -> list[dict[str, Any]]:
    """Correctness (every engine's greedy tokens against torch-kv's), then the issue's targets; each printed as a
    PASS, FAIL, SKIP or INFO line, and returned."""
    checks: list[dict[str, Any]] = []

    def check(label: str, ok: bool | None, detail: str) -> None:
        verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        checks.append({"check": label, "result": verdict, "detail": detail})
        print(f"{verdict} {label}: {detail}")

    print()
    for batch in batches:
        a, b = tokens.get(("onnx-fp32", batch)), tokens.get((BASELINE, batch))
        if a is None or b is None:
            check(f"onnx-fp32 greedy tokens == torch-kv (batch {batch})", None, "needs onnx-fp32 and torch-kv")
        else:
            where = first_divergence(a, b)
            detail = "match yes" if where is None else f"match no (first difference at new token {where})"
            check(f"onnx-fp32 greedy tokens == torch-kv (batch {batch})", where is None, detail)
    for batch in batches:
        q = tokens.get(("onnx-int8", batch))
        ref_name = "onnx-fp32" if ("onnx-fp32", batch) in tokens else BASELINE
        ref = tokens.get((ref_name, batch))
        if q is None or ref is None:
            print(f"INFO int8 vs fp32 tokens (batch {batch}): needs onnx-int8 and onnx-fp32 or torch-kv")
            continue
        where = first_divergence(q, ref)
        info = (
            f"INFO int8 vs {ref_name} greedy tokens (batch {batch}): free-running match {100 * match_rate(q, ref):.1f}%"
            f" ({'identical' if where is None else f'first difference at new token {where}'}), teacher-forced "
            f"agreement {100 * int8_teacher[batch]:.1f}%"
        )
        checks.append(
            {
                "check": f"int8 vs {ref_name} tokens (batch {batch})",
                "result": "INFO",
                "free_running_match": match_rate(q, ref),
                "first_difference": where,
                "teacher_forced_agreement": int8_teacher[batch],
            }
        )
        print(info)

    for engine in (e for e in llama_engines if (e, 1) in tokens):
        ref = tokens.get((BASELINE, 1))
        if ref is None:
            print(f"INFO {engine} vs torch-kv greedy tokens (batch 1): needs torch-kv")
            continue
        got = tokens[(engine, 1)]
        where = first_divergence(got, ref)
        checks.append(
            {
                "check": f"{engine} vs torch-kv tokens (batch 1)",
                "result": "INFO",
                "free_running_match": match_rate(got, ref),
                "first_difference": where,
                "teacher_forced_agreement": llama_teacher[engine],
            }
        )
        print(
            f"INFO {engine} vs torch-kv greedy tokens (batch 1): free-running match {100 * match_rate(got, ref):.1f}% "
            f"({'identical' if where is None else f'first difference at new token {where}'}), teacher-forced "
            f"agreement {100 * llama_teacher[engine]:.1f}%"
        )

    for batch in batches:
        hf, ref = tokens.get(("transformers", batch)), tokens.get((BASELINE, batch))
        if hf is None or ref is None:
            continue
        label = f"transformers greedy tokens == torch-kv up to torch-kv's first end-of-text (batch {batch})"
        firsts = [(row, int(np.flatnonzero(h != r)[0])) for row, (h, r) in enumerate(zip(hf, ref)) if (h != r).any()]
        at_eot = [ref[row, k] == EOT_ID and EOT_ID not in ref[row, :k] for row, k in firsts]
        if not firsts:
            detail = "identical"
        elif all(at_eot):
            detail = (
                f"{len(firsts)} of {len(ref)} rows differ, each first where torch-kv produced end-of-text "
                f"({EOT_ID}), which min_new_tokens forbids transformers"
            )
        else:
            detail = f"{sum(not e for e in at_eot)} row(s) differ before any end-of-text (first differences {firsts})"
        check(label, all(at_eot), detail)

    if not at_target_shape:
        print("(the targets are defined at gpt2-small shapes and 2 threads: informative only here)")
    int8, kv = by_key.get(("onnx-int8", 1)), by_key.get((BASELINE, 1))
    if int8 and kv:
        ratio = int8["tok_s"] / kv["tok_s"]
        check(
            f"onnx-int8 batch-1 tok/s >= {TARGET_INT8_SPEEDUP}x torch-kv",
            ratio >= TARGET_INT8_SPEEDUP,
            f"{ratio:.2f}x ({int8['tok_s']:.1f} vs {kv['tok_s']:.1f} tok/s; steady "
            f"{int8['steady_tok_s'] / kv['steady_tok_s']:.2f}x)",
        )
    else:
        check(f"onnx-int8 batch-1 tok/s >= {TARGET_INT8_SPEEDUP}x torch-kv", None, "needs onnx-int8 and torch-kv")
    for batch in batches:
        int8, hf = by_key.get(("onnx-int8", batch)), by_key.get(("transformers", batch))
        label = f"onnx-int8 ahead of transformers (batch {batch})"
        if int8 and hf:
            ratio = int8["tok_s"] / hf["tok_s"]
            check(label, ratio > 1, f"{ratio:.2f}x ({int8['tok_s']:.1f} vs {hf['tok_s']:.1f} tok/s)")
        else:
            check(label, None, "needs onnx-int8 and transformers")
    check(
        f"int8 file <= {TARGET_INT8_SIZE}x fp32 file",
        sizes["int8_over_fp32"] <= TARGET_INT8_SIZE,
        f"{sizes['int8_over_fp32']:.3f}x ({sizes['onnx_int8_mb']:.1f} vs {sizes['onnx_fp32_mb']:.1f} MB)",
    )
    return checks


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small", help="random weights of this preset (default gpt2-small)")
    ap.add_argument("--checkpoint", default=None, help="a gptflow LM checkpoint (model.pt) instead of --preset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up run (default 1)")
    ap.add_argument(
        "--engines",
        default=",".join(DEFAULT_ENGINES),
        help=f"comma-separated subset of {', '.join(ENGINES)} (default: all but the llamacpp ones)",
    )
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes (default 1,8)")
    ap.add_argument(
        "--warmup-tokens", type=int, default=None, help="new tokens of the warm-up run (default: --new-tokens)"
    )
    ap.add_argument(
        "--work", default=None, help="keep the ONNX, GGUF and Hugging Face files here (default: a temp folder)"
    )
    ap.add_argument("--json", default=None, help="write every record to this file")
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        ap.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    engines = [e for e in ENGINES if e in engines]
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        ap.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if not batches or batches[0] < 1:
        ap.error("--batches: expected positive batch sizes")
    llama_engines = [e for e in engines if e in LLAMACPP]
    llama_cpp = llama_cpp_module() if llama_engines else None  # before minutes of export: one line if missing

    threads = set_threads(args.threads)
    if args.checkpoint:
        opened = open_model(args.checkpoint, CHECKPOINT_LMS)
        model, cfg = opened.language_model(), opened.config
        name = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(0)
        cfg = GPTConfig.from_preset(args.preset)
        model = GPTModel(cfg)
        name = f"{args.preset} (random weights, seed 0)"
    model.eval()
    prompt_len, n = args.prompt_tokens, args.new_tokens
    if prompt_len + n > cfg.context_length:  # stay inside the context: every engine then uses its cache
        n = cfg.context_length - prompt_len
        if n < 2:
            ap.error(f"--prompt-tokens {prompt_len} leaves no room in the context of {cfg.context_length}")
        print(f"note: context {cfg.context_length}: {n} new tokens instead of {args.new_tokens}")
    warmup = min(n, args.warmup_tokens) if args.warmup_tokens else n
    generator = torch.Generator().manual_seed(1234)
    prompts_all = torch.randint(0, cfg.vocab_size, (max(batches), prompt_len), generator=generator).numpy()
    prompt_sets = {b: prompts_all[:b] for b in batches}

    machine = {
        "cpu": cpu_model(),
        "usable_cores": usable_cores(),
        "threads": threads,
        **versions(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_start": os.getloadavg()[0],
    }
    shape = (
        f"{cfg.n_layers} layers x {cfg.emb_dim} emb, {cfg.n_heads} heads, context {cfg.context_length}, "
        f"{model.num_params() / 1e6:.1f}M params"
    )
    print(f"model: {name}; {shape}")
    print(
        f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores; {threads} threads (torch, "
        f"onnxruntime{' and llama.cpp' if llama_engines else ''}); torch {machine['torch']}, onnxruntime "
        f"{machine['onnxruntime']}, transformers {machine['transformers']}, llama-cpp-python {machine['llama_cpp']}; "
        f"{machine['date']}; load average {machine['load_average_start']:.2f}"
    )
    print(
        f"prompt {prompt_len} random tokens, {n} new tokens, greedy, batches {', '.join(map(str, batches))}; "
        f"1 warm-up ({warmup} tokens) + {args.repeats} timed run(s) per engine and batch; engines: {', '.join(engines)}"
    )

    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gptflow-bench-lm-")
        work = Path(tmp.name)
    fp32_path, int8_path, hf_dir = work / "model.onnx", work / "model.int8.onnx", work / "hf"

    sizes: dict[str, float] = {"torch_state_mb": state_size(model) / 1e6}
    t = time.perf_counter()
    export_decoder(model, fp32_path, {"bench": "lm_generate"})
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per graph node
    quantize_decoder(fp32_path, int8_path)
    quantize_s = time.perf_counter() - t
    sizes["onnx_fp32_mb"] = fp32_path.stat().st_size / 1e6
    sizes["onnx_int8_mb"] = int8_path.stat().st_size / 1e6
    sizes["int8_over_fp32"] = sizes["onnx_int8_mb"] / sizes["onnx_fp32_mb"]
    print(
        f"files: torch state (fp32) {sizes['torch_state_mb']:.1f} MB, model.onnx {sizes['onnx_fp32_mb']:.1f} MB, "
        f"model.int8.onnx {sizes['onnx_int8_mb']:.1f} MB (int8/fp32 {sizes['int8_over_fp32']:.3f}x); "
        f"export {export_s:.0f} s, int8 {quantize_s:.0f} s; in {work}"
    )
    ggufs: dict[str, dict[str, Any]] = {}
    if llama_engines:
        started = time.perf_counter()
        vocabulary = bench_vocabulary(cfg.vocab_size)
        vocabulary_s = time.perf_counter() - started
        logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # three INFO lines per file
        for engine in llama_engines:
            quant = LLAMACPP[engine]
            ggufs[quant] = write_engine_gguf(model, vocabulary, work / f"model.{quant}.gguf", quant)
            sizes[f"gguf_{quant}_mb"] = ggufs[quant]["mb"]
            sizes[f"gguf_{quant}_over_onnx_int8"] = ggufs[quant]["mb"] / sizes["onnx_int8_mb"]
        print(
            "files: "
            + ", ".join(
                f"model.{q}.gguf {g['mb']:.1f} MB ({g['mb'] / sizes['onnx_int8_mb']:.2f}x model.int8.onnx, written in "
                f"{g['write_s']:.1f} s)"
                for q, g in ggufs.items()
            )
            + f"; vocabulary {vocabulary_s:.1f} s ({len(vocabulary.tokens)} tokens, {len(vocabulary.merges)} merges)"
        )

    records: list[dict[str, Any]] = []
    tokens: dict[tuple[str, int], np.ndarray] = {}
    int8_teacher: dict[int, float] = {}
    llama_teacher: dict[str, float] = {}
    skipped: list[dict[str, Any]] = []
    for engine in engines:
        started = time.perf_counter()
        engine_batches = batches
        llm = decoder = hf_model = None
        if engine in LLAMACPP:
            engine_batches = [b for b in batches if b == 1]
            for batch in (b for b in batches if b != 1):
                reason = "llama-cpp-python decodes one sequence: batch 1 only"
                skipped.append({"engine": engine, "batch": batch, "reason": reason})
                print(f"  {engine:<13} batch {batch}: skipped ({reason})", flush=True)
            if not engine_batches:
                continue
            llm = open_llama(llama_cpp, ggufs[LLAMACPP[engine]]["path"], cfg.context_length, threads)
            run = llamacpp_runner(llama_cpp, llm)
        elif engine in ("torch-nocache", "torch-kv"):
            run = torch_runner(model, use_cache=engine == "torch-kv")
        elif engine in ("onnx-fp32", "onnx-int8"):
            decoder = Decoder(fp32_path if engine == "onnx-fp32" else int8_path, cfg.context_length, threads)
            run = onnx_runner(decoder)
        else:
            from transformers import GPT2LMHeadModel

            started_write = time.perf_counter()
            save_hf_model(model, hf_dir)
            sizes["hf_safetensors_mb"] = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) / 1e6
            print(
                f"  files: transformers' safetensors {sizes['hf_safetensors_mb']:.1f} MB, written in "
                f"{time.perf_counter() - started_write:.1f} s",
                flush=True,
            )
            hf_model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
            run = transformers_runner(hf_model, pad_id=min(EOT_ID, cfg.vocab_size - 1))
        for batch in engine_batches:
            result, out = measure(run, prompt_sets[batch], n, args.repeats, warmup)
            tokens[(engine, batch)] = out
            records.append({"engine": engine, "batch": batch, "new_tokens": n, "prompt_tokens": prompt_len, **result})
            print(
                f"  {engine:<13} batch {batch}: {result['tok_s']:8.1f} tok/s, steady {result['steady_tok_s']:8.1f}, "
                f"TTFT {result['ttft_ms']:8.1f} ms",
                flush=True,
            )
            if engine == "onnx-int8":
                reference = tokens.get(("onnx-fp32", batch), tokens.get((BASELINE, batch)))
                if reference is not None:
                    int8_teacher[batch] = teacher_forced(decoder, prompt_sets[batch], reference)
            if engine in LLAMACPP and (BASELINE, batch) in tokens:
                llama_teacher[engine] = llamacpp_teacher_forced(
                    llama_cpp, llm, prompt_sets[batch], tokens[(BASELINE, batch)]
                )
        print(f"  ({engine}: {time.perf_counter() - started:.0f} s with warm-ups)", flush=True)
        del run
        if llm is not None:
            llm.close()
        llm = decoder = hf_model = None
        gc.collect()

    machine["load_average_end"] = os.getloadavg()[0]
    # Speed-ups and token agreement against the PyTorch KV-cache loop.
    by_key = {(r["engine"], r["batch"]): r for r in records}
    for r in records:
        base = by_key.get((BASELINE, r["batch"]))
        r["speedup_vs_torch_kv"] = r["tok_s"] / base["tok_s"] if base else None
        ref = tokens.get((BASELINE, r["batch"]))
        r["token_match_vs_torch_kv"] = match_rate(tokens[(r["engine"], r["batch"])], ref) if ref is not None else None

    print(
        f"\n{name}; {shape}; prompt {prompt_len} tokens, {n} new tokens, greedy; {threads} threads; "
        f"{machine['cpu']}; torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, "
        f"transformers {machine['transformers']}, llama-cpp-python {machine['llama_cpp']}; "
        f"load average {machine['load_average_start']:.2f} at the start, "
        f"{machine['load_average_end']:.2f} at the end (other work on the cores slows every engine)"
    )
    print(
        "tok/s: all new tokens of the batch over the whole call; steady: after the first token; TTFT: prompt pass + 1st"
    )
    print(
        "tokens = torch-kv: new tokens equal position by position (after a first difference the continuations diverge)"
    )
    print("file MB: what the engine loads (torch: the fp32 state in memory; transformers: its safetensors)")
    print("| engine | batch | tok/s | steady tok/s | TTFT ms | speedup vs torch-kv | tokens = torch-kv | file MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(records, key=lambda r: (r["batch"], ENGINES.index(r["engine"]))):
        speedup = f"{r['speedup_vs_torch_kv']:.2f}x" if r["speedup_vs_torch_kv"] else "-"
        same = f"{100 * r['token_match_vs_torch_kv']:.1f}%" if r["token_match_vs_torch_kv"] is not None else "-"
        mb = sizes.get(engine_file_key(r["engine"]))
        print(
            f"| {r['engine']} | {r['batch']} | {r['tok_s']:.1f} | {r['steady_tok_s']:.1f} | {r['ttft_ms']:.1f} | "
            f"{speedup} | {same} | {'-' if mb is None else f'{mb:.1f}'} |"
        )
    for skip in skipped:
        print(f"{skip['engine']} batch {skip['batch']}: not measured ({skip['reason']})")

    at_target_shape = not args.checkpoint and args.preset == "gpt2-small" and threads == 2
    checks = check_results(tokens, by_key, sizes, batches, llama_engines, int8_teacher, llama_teacher, at_target_shape)

    if args.json:
        out = {
            "model": {"name": name, "config": cfg.model_dump(), "params": model.num_params()},
            "machine": machine,
            "settings": {
                "prompt_tokens": prompt_len,
                "new_tokens": n,
                "batches": batches,
                "warmup_tokens": warmup,
                "repeats": args.repeats,
                "engines": engines,
                "targets_apply": at_target_shape,
            },
            "sizes": sizes,
            "export_s": export_s,
            "quantize_s": quantize_s,
            "gguf": ggufs,
            "records": records,
            "skipped": skipped,
            "checks": checks,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nrecords: {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
