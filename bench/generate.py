"""Generation speed with vs without the KV cache at gpt2-small shapes (random weights), greedy.

.venv/bin/python -m bench.generate [--new-tokens 200] [--prompt-tokens 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from model.config import GPTConfig
from model.generate import generate
from model.gpt import GPTModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset(args.preset)).eval()
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens))
    generate(model, prompt, 3)  # warm up
    results = {}
    for use_cache in (False, True):
        t = time.perf_counter()
        out = generate(model, prompt, args.new_tokens, use_cache=use_cache)
        results[use_cache] = (out, args.new_tokens / (time.perf_counter() - t))
    same = torch.equal(results[False][0], results[True][0])
    print(
        f"{args.preset}, {args.threads} threads, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
        "greedy (numbers are noisy: other processes share the cores)"
    )
    print(f"no cache : {results[False][1]:8.1f} tokens/s")
    print(f"KV cache : {results[True][1]:8.1f} tokens/s  ({results[True][1] / results[False][1]:.1f}x)")
    print(f"identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
