"""Head and expert graphs: built in one place, passed to layers as data (STYLE.md habit 3).

A graph is an ``edge_index`` (``[2, E]`` long tensor, row 0 = source, row 1 = destination, PyG's
``source_to_target`` convention) with a ``networkx.DiGraph`` view. Self-loops are never part of a
head graph: the router adds them itself where its attention needs them.
"""

from __future__ import annotations

import json
import numbers
from typing import Any, List, Sequence, Union

import networkx as nx
import torch
from torch_geometric.data import Data

GraphLike = Union[str, nx.Graph, torch.Tensor, Sequence[Sequence[int]]]
# graphs are built on the CPU, whatever default device is active (a model built on "meta" to count
# its parameters still needs its graph's structure); modules move them with .to() like any buffer
GRAPH_DEVICE = "cpu"


HEAD_GRAPH_NAMES = ("complete", "ring", "star", "none")


def normalise_graph_spec(spec: Any, name: str) -> Union[str, List[List[int]]]:
    """The JSON form of a graph a config stores: a name stays a name; a networkx graph, an
    ``edge_index [2, E]`` tensor or a sequence of pairs becomes a list of ``[src, dst]`` pairs.

    A string holding a JSON list (``"[[0, 1], [1, 0]]"``, as ``--set head_graph=...`` gives it) is
    read as that list. ``name`` is the config field, for the error message.
    """
    if isinstance(spec, str) and spec.lstrip().startswith("["):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name}={spec!r} is not a valid JSON list of [src, dst] pairs: {err}") from None
    if isinstance(spec, str):
        if name == "expert_graph":  # the bipartite sub-token -> expert graph has no names
            raise ValueError(f"{name}={spec!r} must be None or a list of [sub-token, expert] pairs")
        if spec not in HEAD_GRAPH_NAMES:
            raise ValueError(f"{name}={spec!r} is not one of {list(HEAD_GRAPH_NAMES)}, "
                             "a networkx.DiGraph or an edge_index tensor")
        return spec
    if isinstance(spec, nx.Graph):
        directed = spec if spec.is_directed() else spec.to_directed()
        return sorted([int(s), int(d)] for s, d in directed.edges())
    if isinstance(spec, torch.Tensor):
        if spec.dim() != 2 or spec.shape[0] != 2:
            raise ValueError(f"{name} edge_index must have shape [2, E], got {list(spec.shape)}")
        return [[int(s), int(d)] for s, d in spec.t().tolist()]
    if isinstance(spec, (list, tuple)):
        edges = []
        for edge in spec:
            if not isinstance(edge, (list, tuple)) or len(edge) != 2:
                raise ValueError(f"{name} edges must be [src, dst] pairs, got {edge!r}")
            if not all(isinstance(node, numbers.Integral) and not isinstance(node, bool) for node in edge):
                raise ValueError(f"{name} edge {list(edge)!r} must name nodes by integer ids")
            edges.append([int(edge[0]), int(edge[1])])
        return edges
    raise ValueError(f"{name}={spec!r} must be one of {list(HEAD_GRAPH_NAMES)}, "
                     "a networkx.DiGraph, an edge_index tensor or a list of [src, dst] pairs")


def head_graph(spec: GraphLike, n_heads: int) -> torch.Tensor:
    """Return the ``[2, E]`` edge_index of a head graph given by name, networkx graph or edges.

    The expert <-> expert graph of ``expert_peer_graph`` is built by the same rules, over experts.

    Names: ``complete`` (every ordered pair of distinct heads), ``ring`` (i -> i+1 and i+1 -> i),
    ``star`` (head 0 <-> every other head), ``none`` (no edges). Edges are sorted by
    (destination, source) so that the edge order is the same however the graph was given.
    """
    spec = normalise_graph_spec(spec, "head_graph")
    edges = _named_edges(spec, n_heads) if isinstance(spec, str) else [(s, d) for s, d in spec]
    for src, dst in edges:
        if not (0 <= src < n_heads and 0 <= dst < n_heads):
            raise ValueError(f"head graph edge ({src}, {dst}) names a head outside 0..{n_heads - 1}")
    edges = sorted({(s, d) for s, d in edges if s != d}, key=lambda e: (e[1], e[0]))
    if not edges:
        return torch.empty(2, 0, dtype=torch.long, device=GRAPH_DEVICE)
    return torch.tensor(edges, dtype=torch.long, device=GRAPH_DEVICE).t().contiguous()


def _named_edges(name: str, n: int) -> list:
    if name == "complete":
        return [(s, d) for d in range(n) for s in range(n) if s != d]
    if name == "ring":
        return [(i, (i + 1) % n) for i in range(n)] + [((i + 1) % n, i) for i in range(n)]
    if name == "star":
        return [(0, i) for i in range(1, n)] + [(i, 0) for i in range(1, n)]
    return []  # "none"; normalise_graph_spec refused every other name


def to_networkx(edge_index: torch.Tensor, n_nodes: int, **node_attrs: Any) -> nx.DiGraph:
    """``edge_index [2, E]`` -> ``networkx.DiGraph`` with nodes ``0..n_nodes-1``.

    Each keyword is a per-node sequence stored as a node attribute of that name.
    """
    graph = nx.DiGraph()
    for node in range(n_nodes):
        graph.add_node(node, **{key: values[node] for key, values in node_attrs.items()})
    graph.add_edges_from((int(s), int(d)) for s, d in edge_index.t().tolist())
    return graph


def from_networkx(graph: nx.Graph) -> torch.Tensor:
    """``networkx`` graph with integer nodes -> ``edge_index [2, E]`` (undirected edges both ways)."""
    return head_graph(graph, n_heads=max(graph.nodes, default=-1) + 1)


def to_pyg(edge_index: torch.Tensor, n_nodes: int) -> Data:
    """A PyG ``Data`` holding the graph (``num_nodes`` set explicitly: isolated heads count)."""
    return Data(edge_index=edge_index, num_nodes=n_nodes)


def bipartite_adjacency(edge_index: torch.Tensor, n_src: int, n_dst: int) -> torch.Tensor:
    """``[n_dst, n_src]`` bool matrix, ``True`` where ``src -> dst`` is an edge of ``edge_index [2, E]``."""
    adjacency = torch.zeros(n_dst, n_src, dtype=torch.bool, device=GRAPH_DEVICE)
    adjacency[edge_index[1], edge_index[0]] = True
    return adjacency


def dense_adjacency(edge_index: torch.Tensor, n_nodes: int, self_loops: bool = False) -> torch.Tensor:
    """``[n_nodes(dst), n_nodes(src)]`` bool matrix, ``True`` where ``src -> dst`` is an edge."""
    adjacency = bipartite_adjacency(edge_index, n_nodes, n_nodes)
    if self_loops:
        adjacency |= torch.eye(n_nodes, dtype=torch.bool, device=GRAPH_DEVICE)
    return adjacency


def with_self_loops(edge_index: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """``edge_index [2, E]`` followed by the ``n_nodes`` self-loops: ``[2, E + n_nodes]``."""
    return torch.cat([edge_index, torch.arange(n_nodes, device=GRAPH_DEVICE).repeat(2, 1)], dim=1)


def expert_graph(spec: Any, n_subtokens: int, n_experts: int) -> torch.Tensor:
    """``[2, E]`` edge_index of the bipartite sub-token-slot -> routed-expert graph.

    ``spec`` is ``None`` (complete: every slot may reach every expert) or ``[[slot, expert], ...]``
    with ``expert`` a *routed* expert id ``0..n_experts-1`` (shared experts are always on). Row 0
    holds slots, row 1 experts; edges are sorted by (expert, slot) and deduplicated.
    """
    if spec is None:
        edges = [(s, e) for e in range(n_experts) for s in range(n_subtokens)]
    else:
        edges = [(int(s), int(e)) for s, e in spec]
    for slot, expert in edges:
        if not (0 <= slot < n_subtokens and 0 <= expert < n_experts):
            raise ValueError(f"expert_graph edge {[slot, expert]} out of range: sub-token slots "
                             f"0..{n_subtokens - 1}, routed experts 0..{n_experts - 1} "
                             "(expert ids count routed experts only)")
    edges = sorted(set(edges), key=lambda edge: (edge[1], edge[0]))
    return torch.tensor(edges, dtype=torch.long, device=GRAPH_DEVICE).reshape(-1, 2).t().contiguous()
