"""The figures of a model inspection report (eval.introspection): per layer, each head's attention weights (row =
query, column = key) and one head drawn large; the logit lens (the top-1 token read out after each layer, and the
probability each layer gives the final answer; for a classifier, the class probabilities per layer); a PCA of word
embeddings and of the probe in order and shuffled, with and without positional embeddings (a rotary model, which
has none: block 0's keys without and with the rotation); and the next-token probabilities under each sampling
setting (LM) or the class probabilities (classifier).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import ScaledTranslation

from eval.plots import save_figure

TILE_LABELS_MAX_T = 32  # a head's tile names its rows and columns by piece up to this many tokens
FOCUS_LABELS_MAX_T = 64  # the large map (and the logit lens's columns) up to this many
FOCUS_TEXT_MAX_T = 16  # the large map prints each weight in its cell up to this many
LENS_TEXT_MAX_T = 24  # the logit lens writes the top-1 piece in each cell up to this many
CMAP = "Blues"


def visible(text: str) -> str:
    """A token piece as a reader can see it: spaces as ␣; newlines, tabs, backslashes and other unprintable
    characters as their Python escapes (so a newline piece and a backslash-n piece differ); printable unicode as is."""
    return "".join("␣" if ch == " " else ch if ch.isprintable() and ch != "\\" else repr(ch)[1:-1] for ch in text)


def _plot_text(text: str, width: int) -> str:
    """Text for a plot: cut to `width` characters, `$` escaped so matplotlib parses no mathtext."""
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("$", r"\$")


def _label(piece: str, width: int = 12) -> str:
    return _plot_text(visible(piece), width)


def draw_figures(report: dict, attention: np.ndarray, pieces: Sequence[str], out: Path) -> dict[str, Path]:
    """Every figure of the report as a PNG in `out`: {name: path}."""
    figures: dict[str, Path] = {}
    model = report["model"]
    group = model["n_heads"] // model.get("n_kv_heads", model["n_heads"])  # query heads per key/value head
    for layer, weights in enumerate(attention):
        path = out / f"attention_layer{layer:02d}.png"
        figures[f"attention-layer-{layer}"] = _attention_layer_figure(weights, pieces, layer, path, group)
    layer, head = report["focus"]["layer"], report["focus"]["head"]
    path = out / f"attention_layer{layer:02d}_head{head:02d}.png"
    figures["attention-focus"] = _focus_figure(attention[layer, head], pieces, layer, head, path)
    figures["logit-lens"] = _logit_lens_figure(report, out / "logit_lens.png")
    figures["embeddings-words"] = _words_figure(report["embeddings"]["words"], out / "embeddings_words.png")
    positions = report["embeddings"]["positions"]
    figures["embeddings-positions"] = _positions_figure(positions, out / "embeddings_positions.png")
    if report["kind"] == "classifier":
        figures["classes"] = _classes_figure(report["classes"], out / "classes.png")
    else:
        figures["sampling"] = _sampling_figure(report["sampling"], out / "sampling.png")
    return figures


def _attention_layer_figure(weights: np.ndarray, pieces: Sequence[str], layer: int, path: Path, group: int = 1) -> Path:
    """One tile per head on a shared 0..1 scale; only the outer tiles carry the pieces, so 25 heads stay clear.
    With grouped-query attention (`group` query heads per key/value head) each tile names its key/value head."""
    n_heads, t = weights.shape[0], weights.shape[-1]
    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    labelled = t <= TILE_LABELS_MAX_T
    tile = 2.2 + 0.045 * t if labelled else 2.4
    margin = 1.0 if labelled else 0.3
    fig = Figure(figsize=(cols * tile + margin + 0.9, rows * tile + margin + 0.6))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1] * cols + [0.05])
    labels = [_label(p, 8) for p in pieces]
    fontsize = max(4.0, min(8.0, 60 * tile / t))
    for h in range(n_heads):
        row, col = divmod(h, cols)
        ax = fig.add_subplot(grid[row, col])
        image = ax.imshow(weights[h], cmap=CMAP, vmin=0, vmax=1)
        ax.set_title(f"head {h}" + (f" (kv {h // group})" if group > 1 else ""), fontsize=9)
        # ticks only where labels show (lowest tile of a column, first column): ticks are what makes this slow
        if labelled and h + cols >= n_heads:
            ax.set_xticks(range(t), labels, rotation=90, fontsize=fontsize)
        else:
            ax.set_xticks([])
        if labelled and col == 0:
            ax.set_yticks(range(t), labels, fontsize=fontsize)
        else:
            ax.set_yticks([])
    fig.colorbar(image, cax=fig.add_subplot(grid[:, -1]), label="attention weight")
    # 0.1 inch from the top: at the default y (2% of the height) a tall figure's title overlaps the top tiles' titles
    title = f"layer {layer}: attention weights of each head (row = query, column = key)"
    if group > 1:
        title += f"\n{group} query heads share each key/value head (grouped-query attention)"
    fig.suptitle(title, y=1 - 0.1 / fig.get_figheight())
    return save_figure(fig, path)


def _focus_figure(weights: np.ndarray, pieces: Sequence[str], layer: int, head: int, path: Path) -> Path:
    """One head large: pieces on both axes, and each weight of the causal triangle printed when T is small."""
    t = weights.shape[-1]
    side = min(14.0, 4.0 + 0.16 * t)
    fig = Figure(figsize=(side + 1.6, side + 1.0))
    ax = fig.subplots()
    image = ax.imshow(weights, cmap=CMAP, vmin=0, vmax=1)
    if t <= FOCUS_LABELS_MAX_T:
        labels = [_label(p) for p in pieces]
        fontsize = max(5.0, min(10.0, 45 * side / t))
        ax.set_xticks(range(t), labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(t), labels, fontsize=fontsize)
    if t <= FOCUS_TEXT_MAX_T:
        for (i, j), w in np.ndenumerate(weights):
            if j <= i:
                color = "white" if w > 0.5 else "black"
                ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=7 if t > 8 else 9, color=color)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"layer {layer}, head {head}: attention weights")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    return save_figure(fig, path)


def _logit_lens_figure(report: dict, path: Path) -> Path:
    """Left: per layer (rows), the top-1 read out at each position (LM) or the class probabilities (classifier);
    right, on the same rows: the probability each layer gives the model's final answer."""
    lens = report["logit_lens"]
    n_rows = len(lens["layers"])
    t = len(lens["top1_prob"][0])
    classifier = report["kind"] == "classifier"
    main_width = 6.0 if classifier else max(3.0, t * (0.75 if t <= LENS_TEXT_MAX_T else 0.22))
    fig = Figure(figsize=(main_width + 5.5, max(4.5, 0.3 * n_rows + 2.2)))
    if classifier:
        grid = fig.add_gridspec(1, 2, width_ratios=[main_width, 2.5])
        main = fig.add_subplot(grid[0, 0])
        _class_probabilities_per_layer(main, report)
    else:
        grid = fig.add_gridspec(1, 3, width_ratios=[main_width, 0.15, 2.5])
        main = fig.add_subplot(grid[0, 0])
        _lens_heatmap(main, fig.add_subplot(grid[0, 1]), lens)
    main.set_yticks(range(n_rows), [_plot_text(name, 14) for name in lens["layers"]], fontsize=8)
    line = fig.add_subplot(grid[0, -1], sharey=main)
    line.plot(lens["final_prob"], range(n_rows), "o-")
    line.set_xlim(0, 1.02)
    line.set_xlabel("probability")
    final = lens["top1_piece"][-1][-1]
    answer = f"final class {_plot_text(final, 16)}" if classifier else f"final top-1 {_label(final, 16)}"
    line.set_title(f"P({answer})", fontsize=10)
    line.tick_params(labelleft=False)
    line.grid(alpha=0.3)
    main.set_ylim(n_rows - 0.5, -0.5)  # first layer on top, in both panels (set last: plotting rescales shared axes)
    return save_figure(fig, path)


def _lens_heatmap(ax: Axes, cax: Axes, lens: dict) -> None:
    probs = np.asarray(lens["top1_prob"], dtype=float)
    t = probs.shape[1]
    image = ax.imshow(probs, cmap=CMAP, vmin=0, vmax=1, aspect="auto")
    ax.figure.colorbar(image, cax=cax, label="top-1 probability")
    if t <= FOCUS_LABELS_MAX_T:
        ax.set_xticks(range(t), [_label(p, 10) for p in lens["pieces"]], rotation=90, fontsize=8)
    if t <= LENS_TEXT_MAX_T:
        for (i, j), prob in np.ndenumerate(probs):
            color = "white" if prob > 0.6 else "black"
            ax.text(j, i, _label(lens["top1_piece"][i][j], 8), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("input position (the cell is the next token predicted there)")
    ax.set_title("logit lens: the top-1 next token after each layer", fontsize=10)


def _class_probabilities_per_layer(ax: Axes, report: dict) -> None:
    """Stacked bars, one per layer: every class's probability read out at the pooled position."""
    lens = report["logit_lens"]
    per_row = [{entry["piece"]: entry["probability"] for entry in row} for row in lens["top_k_last"]]
    rows = np.arange(len(per_row))
    left = np.zeros(len(per_row))
    for c in report["classes"]:
        probs = np.array([row.get(c["label"], 0.0) for row in per_row])
        ax.barh(rows, probs, left=left, label=_plot_text(c["label"], 20))
        left = left + probs
    ax.set_xlim(0, 1)
    ax.set_xlabel("class probability")
    below = ax.transAxes + ScaledTranslation(0, -0.45, ax.figure.dpi_scale_trans)  # under the x label at any height
    ncol = min(4, len(report["classes"]))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncol=ncol)
    ax.set_title("logit lens: class probabilities read out after each layer (pooled position)", fontsize=10)


def _words_figure(words: dict, path: Path) -> Path:
    xy = np.asarray(words["xy"], dtype=float).reshape(-1, 2)
    fig = Figure(figsize=(8, 6.5))
    ax = fig.subplots()
    ax.scatter(xy[:, 0], xy[:, 1], s=18)
    for (x, y), label in zip(xy, words["labels"]):
        ax.annotate(_label(label, 16), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8)
    first, second = words["explained_variance"]
    ax.set_xlabel(f"PC 1 ({first:.1%} of the variance)")
    ax.set_ylabel(f"PC 2 ({second:.1%} of the variance)")
    ax.set_title("token embeddings of a word list: first two principal components")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _positions_figure(positions: dict, path: Path) -> Path:
    """The probe's tokens in order (circles) and shuffled (crosses): without positions the two sets coincide."""
    pieces, order = positions["pieces"], positions["order"]
    fig = Figure(figsize=(14, 6.5))
    rotary = positions.get("kind") == "rotary"
    if rotary:  # no position embeddings: block 0's keys, without and with the rotation for their position
        panels = (
            ("without", f"block 0 keys, not rotated (shift {positions['shift_without']:.3g})"),
            ("with", f"block 0 keys rotated for their position, RoPE (shift {positions['shift_with']:.3g})"),
        )
    else:
        panels = (
            ("without", f"token embeddings only (shift {positions['shift_without']:.3g})"),
            ("with", f"token + positional embeddings (shift {positions['shift_with']:.3g})"),
        )
    for ax, (key, title) in zip(fig.subplots(1, 2), panels):
        original = np.asarray(positions[key]["original"], dtype=float).reshape(-1, 2)
        shuffled = np.asarray(positions[key]["shuffled"], dtype=float).reshape(-1, 2)
        ax.plot(original[:, 0], original[:, 1], "o-", color="C0", alpha=0.8, label="original order")
        ax.plot(shuffled[:, 0], shuffled[:, 1], "x--", color="C1", alpha=0.8, label="shuffled order")
        for (x, y), piece in zip(original, pieces):
            ax.annotate(_label(piece), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8, color="C0")
        for (x, y), index in zip(shuffled, order):
            ax.annotate(
                _label(pieces[index]), (x, y), xytext=(4, -10), textcoords="offset points", fontsize=8, color="C1"
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    sentence = " ".join(positions["sentence"].split())
    title = f"the probe in order and shuffled: {_plot_text(sentence, 80)}"
    if rotary:
        title += "\nno position embeddings: rotary positions rotate each head's queries and keys inside attention"
    fig.suptitle(title)
    return save_figure(fig, path)


def _sampling_figure(sampling: dict, path: Path) -> Path:
    """Grouped bars: each setting's probability of the N most likely next tokens."""
    settings = sampling["settings"]
    n = len(sampling["pieces"])
    width = 0.8 / len(settings)
    fig = Figure(figsize=(max(8.0, 0.8 * n + 3.0), 5.0))
    ax = fig.subplots()
    x = np.arange(n)
    for k, s in enumerate(settings):
        label = f"{_plot_text(s['name'], 20)}: entropy {s['entropy']:.3g} nats, support {int(s['support']):,}"
        ax.bar(x + (k - (len(settings) - 1) / 2) * width, s["probs"], width, label=label)
    ax.set_xticks(x, [_label(p, 10) for p in sampling["pieces"]], rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("probability")
    ax.set_title(f"next-token probability of the {n} most likely tokens under each sampling setting")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _classes_figure(classes: Sequence[dict], path: Path) -> Path:
    probs = [float(c["probability"]) for c in classes]
    y = np.arange(len(classes))
    fig = Figure(figsize=(7, max(2.5, 0.45 * len(classes) + 1.5)))
    ax = fig.subplots()
    ax.barh(y, probs, color="C0")
    ax.set_yticks(y, [_plot_text(c["label"], 24) for c in classes])
    ax.invert_yaxis()
    for row, prob in zip(y, probs):
        ax.text(prob + 0.01, row, f"{prob:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("probability")
    ax.set_title("class probabilities")
    return save_figure(fig, path)
