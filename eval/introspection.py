"""Render a model inspection report (the dict model.introspect.inspect_model returns) as files: report.md and its
tables, report.json (all but the attention array), attention.npy, and the figures of `eval.introspection_figures`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from eval.introspection_figures import draw_figures, visible
from gptflow.markdown import markdown_table
from gptflow.storage import atomic_path, write_json_atomic, write_text_atomic

HEADS_IN_MARKDOWN = 10
FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen3"}
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&$#])")


def _md(text: str) -> str:
    """Markdown-escaped text: a piece like `<|endoftext|>` or `*` stays literal, and `|` cannot split a table cell."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _sig(value: Any) -> Any:
    """A number as a plain Python int/float rounded to 4 significant digits (None stays None), for JSON and tables."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(f"{float(value):.4g}")


def table_rows(report: dict) -> dict[str, list[dict]]:
    """The report's tables as rows of plain values (pieces in their visible form), for UI table artifacts and the
    markdown report: tokens, trace, heads (by previous-token weight, highest first), next-token or classes,
    logit-lens (one row per layer) and, for an LM, sampling (one row per setting). Tokens carry their vocabulary
    entry where it differs from the text (a Hugging Face tokenizer's, or GPT-2's); heads the key/value head each
    query head reads in a grouped-query model."""
    lens = report["logit_lens"]
    # a vocabulary's own spelling of each token (Ġ for a leading space) where the report has it and it differs
    spelled = any(t.get("token") not in (None, t["piece"]) for t in report["tokens"])
    head_columns = ["layer", "head", "previous_token", "first_token", "self", "entropy"]
    if grouped_query(report):
        head_columns.insert(2, "kv_head")
    rows: dict[str, list[dict]] = {
        "tokens": [
            {
                "position": int(t["position"]),
                "id": int(t["id"]),
                "piece": visible(t["piece"]),
                **({"vocabulary entry": None if t.get("token") is None else visible(t["token"])} if spelled else {}),
                "special": bool(t["special"]),
            }
            for t in report["tokens"]
        ],
        "trace": [
            {
                "part": s["part"],
                "step": s["step"],
                "module": s["module"],
                "shape": "×".join(str(int(n)) for n in s["shape"]),
                "mean": _sig(s["mean"]),
                "std": _sig(s["std"]),
                "values": ", ".join(f"{v:.4g}" for v in s["values"]),
            }
            for s in report["trace"]
        ],
        "heads": [
            {key: _sig(h[key]) for key in head_columns} for h in sorted(report["heads"], key=_previous_token_first)
        ],
    }
    if report["kind"] == "classifier":
        rows["classes"] = [
            {"label": c["label"], "probability": _sig(c["probability"]), "logit": _sig(c["logit"])}
            for c in report["classes"]
        ]
        rows["logit-lens"] = [
            {
                "layer": name,
                "top class": f"{top[0]} ({prob[0]:.4g})",
                **{f"p {entry['piece']}": _sig(entry["probability"]) for entry in every_class},
            }
            for name, top, prob, every_class in zip(
                lens["layers"], lens["top1_piece"], lens["top1_prob"], lens["top_k_last"]
            )
        ]
        return rows
    rows["next-token"] = [
        {
            "rank": int(n["rank"]),
            "id": int(n["id"]),
            "piece": visible(n["piece"]),
            "probability": _sig(n["probability"]),
            "logit": _sig(n["logit"]),
        }
        for n in report["next_token"]
    ]
    columns = [f"{i} {visible(piece)[:10]}" for i, piece in enumerate(lens["pieces"])]
    rows["logit-lens"] = [
        {"layer": name, **{c: f"{visible(p)} ({q:.4g})" for c, p, q in zip(columns, tops, probs)}}
        for name, tops, probs in zip(lens["layers"], lens["top1_piece"], lens["top1_prob"])
    ]
    rows["sampling"] = [
        {
            "name": s["name"],
            "temperature": _sig(s["temperature"]),
            "top_k": _sig(s["top_k"]),
            "top_p": _sig(s["top_p"]),
            "entropy": _sig(s["entropy"]),
            "support": int(s["support"]),
        }
        for s in report["sampling"]["settings"]
    ]
    return rows


def grouped_query(report: dict) -> bool:
    """Whether the model has fewer key/value heads than query heads (grouped-query attention: Llama, Qwen3)."""
    model = report["model"]
    return model.get("n_kv_heads", model["n_heads"]) < model["n_heads"] and all("kv_head" in h for h in report["heads"])


def rotary(report: dict) -> bool:
    """Whether the model has rotary positions (no position embeddings)."""
    return report["model"].get("positions") == "rope"


def standout_heads(report: dict) -> tuple[dict, dict] | None:
    """(the head that attends most to the previous token, the one that attends most to the first token); None for a
    one-token probe, which has no previous token."""
    heads = [h for h in report["heads"] if h["previous_token"] is not None]
    if not heads:
        return None
    return max(heads, key=lambda h: h["previous_token"]), max(heads, key=lambda h: h["first_token"])


def headline(report: dict) -> dict[str, Any]:
    """The few numbers a run report shows: tokens, the prediction, and the strongest previous-token head."""
    metrics: dict[str, Any] = {"tokens": len(report["tokens"])}
    if report["kind"] == "lm":
        top = report["next_token"][0]
        metrics |= {"next_token": repr(top["piece"]), "next_token_probability": round(top["probability"], 4)}
    else:
        top = max(report["classes"], key=lambda c: c["probability"])
        metrics |= {"class": top["label"], "class_probability": round(top["probability"], 4)}
    if standouts := standout_heads(report):
        previous = standouts[0]
        metrics["previous_token_head"] = f"L{previous['layer']}H{previous['head']} ({previous['previous_token']:.2f})"
    return metrics


def _previous_token_first(head: dict) -> float:
    """Sort key: highest previous-token weight first; a one-token probe has none (None), and those go last."""
    return math.inf if head["previous_token"] is None else -head["previous_token"]


def render_inspection(report: dict, out_dir: str | Path) -> dict[str, Any]:
    """Write report.md, report.json, attention.npy and the PNGs into `out_dir`, each atomically; return their paths
    ({"report", "json", "attention", "figures": {name: path}}) so a task can publish them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attention = np.asarray(report["attention"], dtype=np.float32)
    pieces = [t["piece"] for t in report["tokens"]]
    json_path = write_json_atomic(out / "report.json", {k: v for k, v in report.items() if k != "attention"})
    attention_path = out / "attention.npy"
    with atomic_path(attention_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, attention)

    figures = draw_figures(report, attention, pieces, out)

    markdown_path = write_text_atomic(out / "report.md", _markdown(report, figures))
    return {
        "report": str(markdown_path),
        "json": str(json_path),
        "attention": str(attention_path),
        "figures": {name: str(path) for name, path in figures.items()},
    }


def _markdown(report: dict, figures: dict[str, Path]) -> str:
    rows = table_rows(report)
    model = report["model"]
    classifier = report["kind"] == "classifier"

    def image(name: str, alt: str) -> str:
        return f"![{alt}]({figures[name].name})"

    lines = [f"# Inspection of {_md(report['checkpoint'])} ({report['kind']})", "", "Probe text:", ""]
    lines += [*_fenced(report["text"]), ""]
    if report.get("style"):
        lines += [f"Prompt style: {_md(report['style'])}", ""]
    shape = {
        **({"family": FAMILY_NAMES.get(model["family"], model["family"])} if "family" in model else {}),
        "layers": model["n_layers"],
        "heads": model["n_heads"],
        **({"key/value heads": model["n_kv_heads"]} if "n_kv_heads" in model else {}),
        **({"head dim": model["head_dim"]} if "head_dim" in model else {}),
        "embedding dim": model["emb_dim"],
        "context length": model["context_length"],
        "vocabulary": model["vocab_size"],
        "parameters": f"{model['params']:,}",
    }
    lines += ["## Model", "", *markdown_table([shape], _md_cell), ""]
    if "norm" in model:
        lines += [_architecture(model), ""]
    lines += ["## Tokens", "", *markdown_table(rows["tokens"], _md_cell), ""]
    lines += ["## Forward trace", ""]
    lines += [
        "Each step of the forward pass: the tensor's shape, mean and std, and its first values at the last "
        "position (first head, first row).",
        "",
    ]
    lines += [*markdown_table(rows["trace"], _md_cell), ""]

    lines += ["## Attention", ""]
    if standouts := standout_heads(report):
        previous, first = standouts
        lines += [
            f"Layer {previous['layer']} head {previous['head']} attends most to the previous token (mean weight "
            f"{previous['previous_token']:.3g}); layer {first['layer']} head {first['head']} attends most to the "
            f"first token (mean weight {first['first_token']:.3g}).",
            "",
        ]
    if grouped_query(report):
        group = model["n_heads"] // model["n_kv_heads"]
        lines += [
            f"Grouped-query attention: {model['n_heads']} query heads share {model['n_kv_heads']} key/value "
            f"head{'s' if model['n_kv_heads'] > 1 else ''}, {group} query heads each (`kv_head`); the weights are per "
            "query head.",
            "",
        ]
    lines += [
        f"The {min(HEADS_IN_MARKDOWN, len(rows['heads']))} heads that attend most to the previous token:",
        "",
        *markdown_table(rows["heads"][:HEADS_IN_MARKDOWN], _md_cell),
        "",
    ]
    for name in figures:
        if name.startswith("attention-layer-"):
            lines += [image(name, name.replace("-", " ")), ""]
    focus = report["focus"]
    lines += [image("attention-focus", f"layer {focus['layer']} head {focus['head']}"), ""]

    if classifier:
        lines += [
            "## Classes",
            "",
            *markdown_table(rows["classes"], _md_cell),
            "",
            image("classes", "class probabilities"),
            "",
        ]
    else:
        lines += ["## Next token", "", "Top-k after the final layer at the last position.", ""]
        lines += [*markdown_table(rows["next-token"], _md_cell), ""]
    lines += ["## Logit lens", "", "The top-1 read out after each layer, with its probability.", ""]
    lines += [*markdown_table(rows["logit-lens"], _md_cell), "", image("logit-lens", "logit lens"), ""]

    positions = report["embeddings"]["positions"]
    if positions.get("kind") == "rotary":
        shuffle = (
            "This model has no position embeddings: its positions are rotary (RoPE), a rotation of each head's "
            "queries and keys inside attention. The figure shows block 0's keys of the probe's tokens: shuffling the "
            f"probe moves a token's key by {positions['shift_without']:.3g} on average without the rotation, and by "
            f"{positions['shift_with']:.3g} rotated for its new position."
        )
    else:
        shuffle = (
            f"Shuffling the probe moves a token's point by {positions['shift_without']:.3g} on average with token "
            f"embeddings only, and by {positions['shift_with']:.3g} with positional embeddings added."
        )
    lines += [
        "## Embeddings",
        "",
        image("embeddings-words", "word embeddings"),
        "",
        shuffle,
        "",
        image("embeddings-positions", "embeddings in order and shuffled"),
        "",
    ]
    if not classifier:
        lines += [
            "## Sampling",
            "",
            *markdown_table(rows["sampling"], _md_cell),
            "",
            image("sampling", "sampling settings"),
            "",
        ]
    return "\n".join(lines)


def _architecture(model: dict) -> str:
    """One sentence on the family's switches: norm, MLP, positions, q/k norm."""
    norm = "LayerNorm" if model["norm"] == "layernorm" else "RMSNorm"
    mlp = "a GELU MLP" if model["mlp"] == "gelu" else "a SwiGLU MLP (`silu(gate) * up`)"
    positions = "learned position embeddings" if model["positions"] == "learned" else "rotary positions (RoPE)"
    qk = ", RMSNorm on each head's queries and keys (`q_norm`, `k_norm`)" if model.get("qk_norm") else ""
    return f"Blocks: {norm}, {mlp}, {positions}{qk}."


def _md_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return _md(str(value))


def _fenced(text: str) -> list[str]:
    """`text` in a code fence longer than any run of backticks inside it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return [fence, text, fence]
