"""Token traces: which heads (and experts) each token of a text used, layer by layer.

One panel per layer: a ``[heads, tokens]`` grid of head gates (white = inactive head) and, for MoE
layers, a ``[routed experts, tokens]`` grid of the expert weight each token sent (summed over its
sub-tokens and top-k slots, divided by the number of sub-tokens so a column sums to 1). The
token's characters label the x axis, with whitespace made visible.

A Mixture-of-Recursions model gets a depth row on top (how many recursions each token took) and
one panel per block application, labelled ``B<block> R<recursion>``; a token that skipped a
recursion is white in its panels (its routing there was computed and discarded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..data.tokenizers import byte_decode, byte_encode
from ..models.families import family_of
from ..models.recursion import block_applications
from .figures import fitted_suptitle, new_figure, save_figure

VISIBLE_WHITESPACE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}
# every other control character as its Unicode control picture: byte tokens hold them, and most are
# not allowed in XML, so an SVG (or the report's hover text) carrying one raw would not parse
VISIBLE_CHARACTERS = {**{chr(code): chr(0x2400 + code) for code in range(0x20)}, "\x7f": "\u2421",
                      **VISIBLE_WHITESPACE}
MAX_LABEL_CHARS = 16  # BPE tokens are drawn whole (rotated); only pathological ones are cut
MIN_TRACE_WIDTH = 7.0  # inches: room for the title even for a few tokens


@torch.no_grad()
def token_routing(model: torch.nn.Module, input_ids: torch.Tensor) -> List[Dict[str, Optional[np.ndarray]]]:
    """Per layer ``{"head_gates": [seq, heads], "expert_weight": [seq, routed experts] | None,
    "label": "L<i>", "depth": None}``; for Mixture-of-Recursions per block application, labelled
    ``"B<block> R<recursion>"``, with the skipped tokens' columns zeroed and ``"depth": [seq]``.

    ``input_ids``: ``[seq]`` or ``[1, seq]``. The model runs in eval mode; its mode is restored. A
    seq2seq model's routing here is its encoder's, with the ids as the source.
    """
    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        routing, recursion = family_of(model.config).text_routing(model, ids)
    finally:
        model.train(was_training)
    n_experts = model.config.n_routed_experts
    depth = None if recursion is None else recursion.depth[0].cpu().numpy()
    layers = []
    for index, ((block, step), record) in enumerate(zip(block_applications(model.config), routing)):
        expert_weight = None
        if record.expert_indices is not None:
            indices = record.expert_indices[0].cpu()  # [seq, m, k]
            weights = record.expert_weights[0].float().cpu() if record.expert_weights is not None \
                else torch.ones(indices.shape)
            seq, m = indices.shape[:2]
            expert_weight = torch.zeros(seq, n_experts).scatter_add_(
                1, indices.reshape(seq, -1), weights.reshape(seq, -1)) / m
            expert_weight = expert_weight.numpy()
        head_gates = record.head_gates[0].float().cpu().numpy()
        label = f"L{index}"
        if recursion is not None:
            skipped = ~recursion.selected[step, 0].cpu().numpy()
            head_gates = np.where(skipped[:, None], 0.0, head_gates)
            if expert_weight is not None:
                expert_weight = np.where(skipped[:, None], 0.0, expert_weight)
            label = f"B{block} R{step}"
        layers.append({"head_gates": head_gates, "expert_weight": expert_weight, "label": label, "depth": depth})
    return layers


def token_pieces(ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> List[str]:
    """The text each token adds, decoded from growing prefixes: a character split over several byte
    tokens belongs to its last byte (earlier bytes get ``""``), never a replacement character."""
    pieces, done = [], ""
    for end in range(1, len(ids) + 1):
        text = decode([int(i) for i in ids[:end]]).rstrip("\ufffd")
        piece = text[len(done):] if text.startswith(done) else decode([int(ids[end - 1])])
        done = text if text.startswith(done) else done + piece
        pieces.append(piece.replace("\ufffd", ""))
    return pieces


def token_labels(ids: Sequence[int], decode: Callable[[Sequence[int]], str],
                 max_chars: int = MAX_LABEL_CHARS) -> List[str]:
    """One visible label per token (:func:`token_pieces` with whitespace and control characters
    made visible, ``·`` for an empty piece), cut with ``…`` only beyond ``max_chars`` characters."""
    labels = []
    for piece in token_pieces(ids, decode):
        piece = "".join(VISIBLE_CHARACTERS.get(char, char) for char in piece) or "\u00b7"
        labels.append(piece if len(piece) <= max_chars else piece[:max_chars - 1] + "\u2026")
    return labels


def token_trace(model: torch.nn.Module, text: str, encode: Optional[Callable[[str], Sequence[int]]] = None,
                decode: Optional[Callable[[Sequence[int]], str]] = None, max_tokens: int = 64,
                path: Optional[Union[str, Path]] = None) -> Figure:
    """Draw which heads (and experts) each token of ``text`` used in every layer.

    ``encode`` / ``decode`` default to byte-level UTF-8. Every token is drawn: a text longer than
    ``max_tokens`` (or the model's ``max_seq_len``) is refused with a message, never cut silently.
    """
    encode, decode = encode or byte_encode, decode or byte_decode
    ids = [int(i) for i in encode(text)]
    limit = min(max_tokens, model.config.max_seq_len)
    if not ids:
        raise ValueError("text for the token trace is empty")
    if len(ids) > limit:
        raise ValueError(f"the token trace draws one column per token and this text is {len(ids)} tokens; at most "
                         f"{limit} fit (max_tokens={max_tokens}, the model's max_seq_len={model.config.max_seq_len}):"
                         " shorten the text (--text) or raise --trace-tokens")
    vocab = model.config.vocab_size
    if max(ids) >= vocab or min(ids) < 0:
        raise ValueError(f"text encodes to token ids outside the model's vocab_size={vocab}; "
                         "pass the encode/decode of the tokenizer the model was trained with")
    layers = token_routing(model, torch.tensor(ids))
    labels = token_labels(ids, decode)

    panels = []  # (label, kind, values [rows, tokens])
    if layers[0]["depth"] is not None:
        panels.append(("MoR", "depth", layers[0]["depth"][None, :].astype(float)))
    for layer in layers:
        panels.append((layer["label"], "heads", layer["head_gates"].T))
        if layer["expert_weight"] is not None:
            panels.append((layer["label"], "experts", layer["expert_weight"].T))
    rows = [values.shape[0] for _, _, values in panels]
    longest = max(len(label) for label in labels)
    rotate = longest > 2  # BPE pieces: vertical labels, drawn whole
    label_height = 0.09 * longest if rotate else 0.0
    figure = new_figure(max(MIN_TRACE_WIDTH, 2.2 + 0.2 * len(ids)),
                        1.2 + 0.17 * sum(rows) + 0.3 * len(panels) + 2 * label_height)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False,
                           gridspec_kw={"height_ratios": [r + 1.5 for r in rows]})[:, 0]
    gate_max = max(float(layer["head_gates"].max()) for layer in layers) or 1.0
    for ax, (label, kind, values) in zip(axes, panels):
        vmax = {"heads": gate_max, "experts": 1.0, "depth": float(model.config.max_recursions)}[kind]
        # zero (inactive head, expert not chosen) is masked to white, distinct from any small value
        cmap = colormaps[{"heads": "viridis", "experts": "plasma", "depth": "cividis"}[kind]].with_extremes(bad="white")
        image = ax.imshow(np.ma.masked_equal(values, 0.0), cmap=cmap, vmin=0.0, vmax=vmax,
                          aspect="auto", interpolation="nearest")
        ax.set_ylabel(f"{label}\n{kind}", fontsize=7, rotation=0, ha="right", va="center")
        ax.set_yticks(range(values.shape[0]))
        ax.tick_params(axis="y", labelsize=5)
        bar = figure.colorbar(image, ax=ax, pad=0.01, fraction=0.02, aspect=8)
        bar.ax.tick_params(labelsize=5)
        bar.set_label("head gate" if kind == "heads" else "expert weight", fontsize=6)
    rotation = 90 if rotate else 0
    bottom = axes[-1]
    bottom.set_xticks(range(len(ids)), labels=labels, fontsize=7, rotation=rotation)
    top = axes[0].secondary_xaxis("top")
    top.set_xticks(range(len(ids)), labels=labels, fontsize=7, rotation=rotation)
    with_experts = any(kind == "experts" for _, kind, _ in panels)
    fitted_suptitle(figure, "token trace: head gates and expert weights per token (white = inactive / not chosen)"
                            if with_experts else "token trace: head gates per token (white = inactive head)", fontsize=9)
    save_figure(figure, path)
    return figure
