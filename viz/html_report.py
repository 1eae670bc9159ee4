"""One self-contained HTML file of a run: curves, routing graphs, heatmaps, sources, a token box.

:func:`html_report` returns a single page with every style and script inline and every picture
as inline SVG: no CDN, no font or image file, no request of any kind, so it opens from disk on a
machine without network. Sections:

* training curves (the :func:`~gohgraph.viz.curves.training_curves` figure as vector SVG);
* one routing graph per layer; hover a head or expert for its activation or load and top tokens,
  an edge for its mean flow; with SwitchHead each head's value and output experts (their share of
  the head's choices), with MoSA the sparse heads (the share of tokens each keeps);
* load heatmaps (head activation frequency, expert utilisation, SwitchHead's expert load per head,
  MoSA's kept share per sparse head), cross-layer transitions;
* specialisation by source (when the statistics were collected by source);
* a text box: hover a token to see, per layer, the heads it activated with their gates and the
  experts it was sent to with their weights (from the model's routing records, see
  :func:`~gohgraph.viz.token_trace.token_routing`);
* for a decoder, given ``ablation`` (``gohgraph ablate``'s JSON) and / or ``logit_lens``: the Δ loss
  heatmaps of each unit forced off / on and the tokens each unit promotes; both are added to every
  unit's hover text in the routing graphs (:mod:`gohgraph.viz.html_units`).

A seq2seq model's page has the routing sections once per attention kind (encoder self, decoder
self, cross), each titled with it, and its text box reads the text as a source (encoder routing).

The interactivity is ~80 lines of hand-written JavaScript (``report.js``) over SVG that Python
writes; no library was needed for tooltips and one hover table, and none then has to be vendored.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from ..data.objectives import SpecialTokens
from ..data.tokenizers import byte_decode, byte_encode
from ..models.families import family_of
from .curves import training_curves
from .figures import KIND_TITLES, has_experts
from .html_svg import diverging_colour, heatmap_svg, routing_graph_svg, sequential_colour, signed_colour
from .html_units import ablation_section, check_ablation, lens_table, unit_notes
from .kinds import kind_reports
from .saturation import saturation_figure
from .token_trace import VISIBLE_CHARACTERS, token_pieces, token_routing

ASSETS = Path(__file__).resolve().parent
MAX_REPORT_TOKENS = 512  # the text box keeps one hover target per token


def html_report(model: torch.nn.Module, stats: Any, text: Optional[str] = None,
                metrics_csv: Optional[Union[str, Path]] = None,
                encode: Optional[Callable[[str], Sequence[int]]] = None,
                decode: Optional[Callable[[Sequence[int]], str]] = None, title: str = "gohgraph routing report",
                ablation: Optional[Dict[str, Any]] = None, logit_lens: Optional[Dict[str, Any]] = None,
                saturation: Optional[Dict[str, Any]] = None) -> str:
    """The report page as a string (see the module docstring). ``stats``: a ``RoutingStats`` or its
    report; for a seq2seq model a ``KindRoutingStats`` (or its report), whose attention kinds
    (encoder self, decoder self, cross) each get their routing sections, and whose text box shows
    the encoder's routing of the text as a source. A decoder's page may add ``ablation`` (``gohgraph
    ablate``'s JSON) and ``logit_lens`` (``{"heads": ..., "experts": ...}``): a section each, and
    every unit's hover in the routing graphs names its Δ loss and the tokens it promotes
    (:mod:`gohgraph.viz.html_units`), and ``saturation`` (the run's router saturation,
    :func:`gohgraph.analysis.saturation.routing_saturation`) a section with its picture."""
    kinds = kind_reports(stats)
    if len(kinds) > 1 and (ablation is not None or logit_lens is not None):
        raise ValueError("ablation and logit_lens are a decoder's analyses; this report has several attention kinds")
    if ablation is not None:
        ablation = check_ablation(ablation)
    encode, decode = encode or byte_encode, decode or byte_decode
    label = _token_labeller(model, decode)
    notes = unit_notes(ablation, logit_lens, label)
    sections = [_header(kinds, title)]
    if metrics_csv is not None and Path(metrics_csv).is_file():
        sections.append(_section("Training curves", f'<div class="curves">{_curves_svg(metrics_csv)}</div>'))
    for kind, report in kinds.items():
        sections += _routing_sections(report, label, KIND_TITLES[kind] if len(kinds) > 1 else None, notes)
    if ablation is not None:
        heatmaps = ablation_section(ablation, logit_lens, label, delta_colour(ablation))
        sections.append(_section(
            "Ablation: Δ loss per unit", f'<div class="row">{heatmaps}</div>',
            f"validation loss with the unit forced off (or on) minus the baseline {ablation['baseline_loss']:.4f} "
            "nats/token: red = the model needs it. Hover a cell for its Δ loss and the tokens the unit promotes."))
    if saturation is not None:
        sections.append(_section("Router saturation across the run's checkpoints",
                                 f'<div class="curves">{_figure_svg(saturation_figure(saturation))}</div>',
                                 "per layer, the share of the final model's top-k choices each kept checkpoint "
                                 "already makes on the same validation tokens (1 = settled)."))
    if logit_lens is not None:
        sections.append(_section("Logit lens: the tokens each unit promotes", lens_table(logit_lens, label),
                                 "W_U times the unit's mean applied output (direct logit attribution), best first."))
    tokens: List[Dict[str, Any]] = []
    if text:
        box, tokens = _token_box(model, text, encode, decode)
        seq2seq = len(kinds) > 1
        sections.append(_section("Routing of each token" + (" (encoder, the text as a source)" if seq2seq else ""),
                                 box, "Hover a token: the heads each layer activated (gate) and the experts it "
                                      "chose (weight, summed over sub-tokens and divided by their number)."))
    data = {"tokens": tokens, "has_experts": any(has_experts(report) for report in kinds.values())}
    return _page(title, "".join(sections), data)


def write_html_report(path: Union[str, Path], model: torch.nn.Module, stats: Any, **kwargs: Any) -> Path:
    """Write :func:`html_report` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_report(model, stats, **kwargs), encoding="utf-8")
    return path


# ---------------------------------------------------------------------- sections
def _header(kinds: Dict[str, Dict[str, Any]], title: str) -> str:
    first = next(iter(kinds.values()))
    cfg = first["config"]
    experts = (f", ffn={cfg['ffn']} with {cfg['n_experts']} experts ({cfg['n_shared_experts']} shared), "
               f"top-{cfg['top_k_experts']} per sub-token, {cfg['n_subtokens']} sub-token(s)"
               if cfg["ffn"] != "dense" else ", dense feed-forward")
    if len(kinds) > 1:  # seq2seq: the decoder's two attentions count the same target positions
        depth = "; ".join(f"{KIND_TITLES[kind]}: {len(report['layers'])} layers" for kind, report in kinds.items())
        counted = f"{kinds['encoder']['tokens']:,} source and {kinds['decoder_self']['tokens']:,} target tokens"
    else:
        depth, counted = f"{cfg['n_layers']} layers", f"{first['tokens']:,} tokens"
    return (f"<h1>{html.escape(title)}</h1><p class=\"meta\">{depth}, {cfg['n_heads']} heads "
            f"({cfg['n_shared_heads']} shared, top-{cfg['top_k_heads']} routed), router={cfg['router']}"
            f"{_attention_units(first['layers'][0])}{experts}. Statistics over {counted} ({first['batches']} batches), padding "
            "excluded.</p>")


def _attention_units(layer: Dict[str, Any]) -> str:
    """What routes inside the attention, read from a layer's statistics: SwitchHead's experts, MoSA's sparse heads."""
    parts = []
    if "attention_experts" in layer:
        parts.append(f"SwitchHead with {len(layer['attention_experts']['output']['load'][0])} value and output "
                     "experts per head")
    if "sparse_heads" in layer:
        parts.append(f"{len(layer['sparse_heads']['kept_share'])} MoSA sparse heads")
    return "".join(f", {part}" for part in parts)


def _routing_sections(report: Dict[str, Any], label: Callable[[int], str], kind_title: Optional[str],
                      notes: Optional[Dict[Any, str]] = None) -> List[str]:
    """The routing graphs, load heatmaps, cross-layer transitions and specialisation by source of
    one report; ``kind_title`` (e.g. ``"cross-attention"``) names the attention kind in each title;
    ``notes`` add a line to units' hover texts (:func:`~gohgraph.viz.html_units.unit_notes`)."""
    cfg = report["config"]
    named = lambda name: f"{name} ({kind_title})" if kind_title else name  # noqa: E731
    graphs = "".join(
        f'<figure>{routing_graph_svg(layer, report["head_edges"], cfg["n_shared_heads"], label, notes)}'
        f'<figcaption>layer {layer["layer"]}</figcaption></figure>' for layer in report["layers"])
    sections = [_section(named("Routing graph per layer"), f'<div class="row">{graphs}</div>',
                         "node size: how often a head is active (experts: utilisation); "
                         "arrow width: mean effective inter-head flow. Hover for the numbers and top tokens."
                         + _attention_units_hint(report)),
                _section(named("Load heatmaps"), f'<div class="row">{_load_heatmaps(report)}</div>')]
    sections.append(_section(named("Co-activation within each layer"), f'<div class="row">{_coactivation(report)}</div>',
                             "P(b | a): of the tokens that route to unit a, the share that also route to b "
                             "(experts: per sub-token's top-k set); blank where a is never chosen."))
    if report.get("vocabulary"):
        sections.append(_section(named("Vocabulary specialisation"), _vocabulary(report["vocabulary"], label),
                                 "per unit, the tokens it is most specialised to: the share of the token's "
                                 "decisions that go to the unit (tokens seen at least a few times)."))
    if report.get("cross_layer"):
        sections.append(_section(named("Across layers"), f'<div class="row">{_cross_layer(report)}</div>',
                                 "P(next-layer choice | this-layer choice), counting every top-k assignment."))
    if "by_source" in report:
        sections.append(_section(named("Specialisation by source"), f'<div class="row">{_by_source(report)}</div>',
                                 "(share of the node's tokens from the source) / (the source's share of all "
                                 "tokens): 1 = no preference, red = prefers, blue = avoids."))
    return sections


def _section(title: str, body: str, hint: str = "") -> str:
    hint_html = f'<p class="hint">{html.escape(hint)}</p>' if hint else ""
    return f"<section><h2>{html.escape(title)}</h2>{hint_html}{body}</section>"


def _curves_svg(metrics_csv: Union[str, Path]) -> str:
    return _figure_svg(training_curves(metrics_csv))


def _figure_svg(figure) -> str:
    """A matplotlib figure as inline SVG."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: inline SVG needs neither


def _load_heatmaps(report: Dict[str, Any]) -> str:
    layers = report["layers"]
    n_heads = len(layers[0]["heads"]["activation_frequency"])
    values = [layer["heads"]["activation_frequency"] for layer in layers]
    parts = [heatmap_svg(values, [f"layer {layer['layer']}" for layer in layers], [f"h{h}" for h in range(n_heads)],
                         sequential_colour(1.0),
                         lambda i, j, v: f"layer {layers[i]['layer']}, head h{j}: active for {v:.1%} of tokens",
                         "head activation frequency")]
    expert_layers = [layer for layer in layers if "experts" in layer]
    if expert_layers:
        utilisation = [layer["experts"]["utilisation"] for layer in expert_layers]
        parts.append(heatmap_svg(
            utilisation, [f"layer {layer['layer']}" for layer in expert_layers],
            [f"e{e}" for e in range(len(utilisation[0]))], diverging_colour(1.0, 4.0),
            lambda i, j, v: (f"layer {expert_layers[i]['layer']}, expert e{j}: utilisation {v:.2f}x the ideal "
                             f"load, {expert_layers[i]['experts']['assignment_count'][j]} assignments"),
            "expert utilisation (1 = equal share)"))
    parts += _attention_expert_heatmaps(layers)
    sparse_layers = [layer for layer in layers if "sparse_heads" in layer]
    if sparse_layers:
        kept = [layer["sparse_heads"]["kept_share"] for layer in sparse_layers]
        parts.append(heatmap_svg(
            kept, [f"layer {layer['layer']}" for layer in sparse_layers], [f"m{i}" for i in range(len(kept[0]))],
            sequential_colour(1.0),
            lambda i, j, v: (f"layer {sparse_layers[i]['layer']}, sparse head m{j}: keeps {v:.1%} of tokens "
                             f"({sparse_layers[i]['sparse_heads']['kept_count'][j]}), mean router score "
                             f"{sparse_layers[i]['sparse_heads']['mean_score_kept'][j]:.3f} on them"),
            "sparse heads: share of tokens kept"))
    return "".join(parts)


def _attention_units_hint(report: Dict[str, Any]) -> str:
    hint = ""
    if any("attention_experts" in layer for layer in report["layers"]):
        hint += (" SwitchHead: each head's value experts (inner arc) and output experts (outer arc), size and "
                 "line width = share of the head's choices; under GQA a kv head's value experts sit between "
                 "the query heads that read them.")
    if any("sparse_heads" in layer for layer in report["layers"]):
        hint += " MoSA: the sparse heads in their own column, size = share of the tokens each keeps."
    return hint


def _attention_expert_heatmaps(layers: List[Dict[str, Any]]) -> List[str]:
    """SwitchHead: per side, one ``[layer and head, expert]`` grid of each head's share of choices,
    coloured by that share over the even share 1/E."""
    parts = []
    for side in ("value", "output"):
        rows, labels, counts = [], [], []
        for layer in layers:
            section = layer.get("attention_experts", {}).get(side)
            if section is None:
                continue
            owner = "h" if len(section["load"]) == len(layer["heads"]["activation_frequency"]) else "kv"
            rows += section["load"]
            counts += section["assignment_count"]
            labels += [f"L{layer['layer']} {owner}{h}" for h in range(len(section["load"]))]
        if not rows:
            continue
        n_experts = len(rows[0])
        ratio = diverging_colour(1.0, 4.0)
        parts.append(heatmap_svg(
            rows, labels, [f"{side[0]}{e}" for e in range(n_experts)], lambda v, n=n_experts: ratio(None if v is None else v * n),
            lambda i, j, v, lab=labels, c=counts, sd=side: (f"{lab[i]}, {sd} expert {j}: {v:.1%} of the head's "
                                                            f"choices ({c[i][j]})"),
            f"{side} experts: share of each head's choices", cell=26))
    return parts


def _coactivation(report: Dict[str, Any]) -> str:
    """One P(b | a) heatmap per layer for heads, and for experts where the layer has them."""
    parts = []
    for kind, prefix in (("heads", "h"), ("experts", "e")):
        for layer in report["layers"]:
            given = layer.get(kind, {}).get("coactivation_given")
            if not given:
                continue
            names = [f"{prefix}{i}" for i in range(len(given))]
            parts.append(heatmap_svg(
                given, names, names, sequential_colour(1.0),
                lambda i, j, v, p=prefix, n=layer["layer"]: (
                    f"layer {n}: P({p}{j} | {p}{i}) = {v:.3f}" if v is not None else
                    f"layer {n}: {p}{i} is never chosen"),
                f"{kind} layer {layer['layer']}: P(b | a)", cell=26))
    return "".join(parts)


def _vocabulary(vocabulary: Dict[str, Any], label: Callable[[int], str], shown: int = 5) -> str:
    """A table per layer and unit kind: each unit's most specialised input tokens and their shares."""
    rows = []
    for layer in vocabulary["layers"]:
        for kind in ("heads", "experts"):
            section = layer.get(kind, {}).get("input")
            if not section:
                continue
            prefix = "h" if kind == "heads" else "e"
            for unit, tokens in zip(section["units"], section["top_tokens"]):
                cells = ", ".join(f"{html.escape(_visible(label(token_id)))} ({share:.0%})"
                                  for token_id, share, _ in tokens[:shown])
                rows.append(f"<tr><td>{layer['layer']}</td><td>{prefix}{unit}</td><td>{cells or '-'}</td></tr>")
    return ('<table class="lens"><tr><th>layer</th><th>unit</th><th>most specialised input tokens (share of the '
            f'token\'s decisions)</th></tr>{"".join(rows)}</table>')


def _cross_layer(report: Dict[str, Any]) -> str:
    parts = []
    for pair in report["cross_layer"]:
        kind = "experts" if "experts" in pair else "heads"
        section, (first, second) = pair[kind], pair["layers"]
        prefix = "e" if kind == "experts" else "h"
        n = len(section["transition"])
        share = section["top_successor_share"]
        title = (f"{kind} layer {first} \u2192 {second}"
                 + (f" (top successor {share:.0%})" if share is not None else ""))
        parts.append(heatmap_svg(
            section["transition"], [f"{prefix}{i} (L{first})" for i in range(n)],
            [f"{prefix}{j}" for j in range(len(section["transition"][0]))], sequential_colour(1.0),
            lambda i, j, v, s=section, p=prefix, a=first, b=second: (
                f"{p}{i} in layer {a} \u2192 {p}{j} in layer {b}: P = {v:.3f}, co-occurrence "
                f"{s['cooccurrence'][i][j]:.1f}"), title, cell=26))
    return "".join(parts)


def _by_source(report: Dict[str, Any]) -> str:
    by_source = report["by_source"]
    parts = []
    for layer in by_source["layers"]:
        kind = "experts" if "experts" in layer else "heads"
        prefix = "e" if kind == "experts" else "h"
        scores = layer[kind]["specialisation"]
        sources = list(scores)
        rows = [scores[source] for source in sources]
        parts.append(heatmap_svg(
            rows, sources, [f"{prefix}{j}" for j in range(len(rows[0]))], diverging_colour(1.0, 4.0),
            lambda i, j, v, s=sources, p=prefix, at=layer["layer"]: (
                f"layer {at}, {p}{j}, source {s[i]}: specialisation "
                + ("undefined (never chosen)" if v is None else f"{v:.2f}")),
            f"layer {layer['layer']}: {kind} by source"))
    return "".join(parts)


def _token_box(model: torch.nn.Module, text: str, encode, decode) -> tuple:
    ids = [int(i) for i in encode(text)]
    limit = min(MAX_REPORT_TOKENS, model.config.max_seq_len)
    if not ids:
        raise ValueError("the report's text is empty")
    if len(ids) > limit:
        raise ValueError(f"the report's text encodes to {len(ids)} tokens; its text box shows at most {limit} "
                         f"(min of {MAX_REPORT_TOKENS} and the model's max_seq_len): shorten --text")
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"the text encodes to token ids outside the model's vocab_size={model.config.vocab_size}; "
                         "use the tokenizer the model was trained with")
    layers = token_routing(model, torch.tensor(ids))
    pieces = token_pieces(ids, decode)
    tokens, spans = [], []
    for t, (token_id, piece) in enumerate(zip(ids, pieces)):
        per_layer = []
        for layer in layers:
            gates = layer["head_gates"][t]
            entry = {"heads": [[h, round(float(g), 4)] for h, g in enumerate(gates) if g > 0]}
            if layer["expert_weight"] is not None:
                entry["experts"] = [[e, round(float(w), 4)] for e, w in enumerate(layer["expert_weight"][t]) if w > 0]
            per_layer.append(entry)
        tokens.append({"id": token_id, "label": piece, "layers": per_layer})
        spans.append(f'<span class="token" data-index="{t}">{html.escape(piece or chr(0xB7))}</span>')
    box = (f'<div id="text-box">{"".join(spans)}</div><div id="token-detail"><p class="hint">'
           f'{len(ids)} tokens; hover one.</p></div>')
    return box, tokens


def delta_colour(ablation: Dict[str, Any]) -> Callable[[Optional[float]], str]:
    """:func:`~gohgraph.viz.html_svg.signed_colour` scaled to the largest |Δ loss| of the per-unit rows."""
    values = [abs(row["delta_loss"]) for row in ablation["interventions"] if row["layer"] is not None]
    return signed_colour(max(values + [1e-9]))


def _page(title: str, body: str, data: Dict[str, Any]) -> str:
    css = (ASSETS / "report.css").read_text(encoding="utf-8")
    script = (ASSETS / "report.js").read_text(encoding="utf-8")
    # "</" inside the JSON would end the script element early
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{css}</style></head><body>{body}'
            f'<div id="tooltip" hidden></div>'
            f'<script type="application/json" id="report-data">{payload}</script>'
            f"<script>{script}</script></body></html>\n")


def _token_labeller(model: torch.nn.Module, decode: Callable[[Sequence[int]], str]) -> Callable[[int], str]:
    """``token id -> label`` for the hover texts: the decoded piece; for an id the tokenizer cannot
    decode, the name of the special token a gohgraph objective puts there (``[PAD]``, ...), else ``[id]``.
    Bytes refuse an id past 255; a BPE decodes an id past its vocabulary to ``""``: both are not decodable."""
    special_names: Dict[int, str] = {}
    if family_of(model.config).special_tokens:  # the objectives' layout: specials after the tokenizer's ids
        special = SpecialTokens.of_model(model.config)
        special_names = {special.mask: "[MASK]", special.cls: "[CLS]", special.pad: "[PAD]"}
        if special.with_eos:
            special_names[special.eos] = "[EOS]"

    def label(token_id: int) -> str:
        try:
            piece = decode([int(token_id)])
        except (ValueError, KeyError, IndexError):
            piece = ""
        return _visible(piece) if piece else special_names.get(int(token_id), f"[{int(token_id)}]")

    return label


def _visible(piece: str) -> str:
    return "".join(VISIBLE_CHARACTERS.get(char, char) for char in piece) or "\u00b7"
