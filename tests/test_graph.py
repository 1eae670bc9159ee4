"""Head graphs: names, networkx and edge_index inputs, conversions both ways."""

import networkx as nx
import pytest
import torch

from gohgraph.graph import dense_adjacency, from_networkx, head_graph, to_networkx, to_pyg


def edges(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


def test_named_graphs_have_the_expected_edges():
    assert edges(head_graph("complete", 4)) == {(s, d) for s in range(4) for d in range(4) if s != d}
    assert edges(head_graph("ring", 4)) == {(0, 1), (1, 2), (2, 3), (3, 0), (1, 0), (2, 1), (3, 2), (0, 3)}
    assert edges(head_graph("star", 4)) == {(0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0)}
    assert head_graph("none", 4).shape == (2, 0)


def test_unknown_name_and_out_of_range_edges_are_refused():
    with pytest.raises(ValueError, match="head_graph='grid'"):
        head_graph("grid", 4)
    with pytest.raises(ValueError, match=r"edge \(0, 7\) names a head outside 0..3"):
        head_graph([(0, 7)], 4)


def test_networkx_round_trip_and_edge_order_is_canonical():
    graph = nx.DiGraph([(3, 1), (0, 1), (1, 2)])
    graph.add_nodes_from(range(5))
    edge_index = head_graph(graph, 5)
    assert edge_index.tolist() == [[0, 3, 1], [1, 1, 2]]  # sorted by (destination, source)
    back = to_networkx(edge_index, 5, shared=[True, False, False, False, False])
    assert set(back.edges) == set(graph.edges) and back.number_of_nodes() == 5
    assert back.nodes[0]["shared"] is True
    assert torch.equal(from_networkx(back), edge_index)


def test_undirected_networkx_graph_gives_both_directions():
    assert edges(head_graph(nx.path_graph(3), 3)) == {(0, 1), (1, 0), (1, 2), (2, 1)}


def test_pyg_data_and_dense_adjacency():
    edge_index = head_graph("ring", 5)
    data = to_pyg(edge_index, 5)
    assert data.num_nodes == 5 and torch.equal(data.edge_index, edge_index)
    adjacency = dense_adjacency(edge_index, 5, self_loops=True)
    for src in range(5):
        for dst in range(5):
            assert adjacency[dst, src].item() == ((src, dst) in edges(edge_index) or src == dst)
