"""GA-Net's graph: the dense form, torch_geometric's GCNConv and a from-the-definition GCN
over the whole [bank; queries] graph agree, including tied similarities and isolated nodes."""

import pytest
import torch
import torch.nn.functional as F

from mmdeploy.models.ganet import graph
from mmdeploy.models.ganet.layer import GraphAdapterLayer

pytest.importorskip("torch_geometric", reason="the training form needs torch_geometric")


def random_graph(seed: int, n_bank: int = 12, n_query: int = 6, dim: int = 8):
    """Unit-norm bank and query nodes; a few exact duplicates make tied similarities."""
    generator = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n_bank, dim, generator=generator), dim=-1)
    bank[3] = bank[2]  # a tie for every node's similarity to 2 and 3
    queries = F.normalize(torch.randn(n_query, dim, generator=generator), dim=-1)
    queries[1] = bank[5]  # a query identical to a bank node
    return bank, queries


def trained_layer(dim: int, rank: int = 4) -> GraphAdapterLayer:
    torch.manual_seed(0)
    layer = GraphAdapterLayer(dim, rank, alpha=0.7)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)  # up starts at zero: make it do something
    return layer


def reference_gcn(layer, x, mask, bank, adjacency):
    """Kipf-Welling on the full graph, written from the definition: A has bank<->bank edges
    and bank->query edges; out = D^-1/2 (A + I) D^-1/2 X W + b with D the in-degree."""
    n_bank, n = len(bank), len(bank) + len(x)
    a = torch.zeros(n, n)  # a[target, source]
    a[:n_bank, :n_bank] = adjacency
    a[n_bank:, :n_bank] = mask
    a = a + torch.eye(n)
    degree = a.sum(1)
    norm = degree.rsqrt()[:, None] * a * degree.rsqrt()[None, :]
    nodes = layer.down(torch.cat([bank, x]))
    out = norm @ (nodes @ layer.gcn_weight.T) + layer.gcn_bias
    return x + layer.alpha * layer.up(F.relu(out[n_bank:]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("k", "tau"), [(3, 0.0), (5, 0.4), (2, 0.95), (20, -1.0)])
def test_dense_pyg_and_definition_agree(seed, k, tau):
    bank, queries = random_graph(seed)
    layer = trained_layer(bank.shape[1])
    adjacency = graph.bank_adjacency(bank, k, tau)
    mask = graph.neighbour_mask(queries @ bank.T, k, tau).float()
    with torch.no_grad():
        dense = layer(queries, mask, layer.bank_messages(bank, adjacency))
        pyg = layer.forward_pyg(queries, mask, bank, adjacency)
        reference = reference_gcn(layer, queries, mask, bank, adjacency)
    torch.testing.assert_close(dense, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(pyg, reference, atol=1e-5, rtol=0)


def test_ties_admit_every_tied_neighbour():
    similarity = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    assert graph.neighbour_mask(similarity, 2, 0.0).tolist() == [[True, True, True, False]]
    assert graph.neighbour_mask(similarity, 2, 0.6).tolist() == [[True, False, False, False]]


def test_isolated_nodes_keep_only_their_self_loop():
    bank, queries = random_graph(0)
    layer = trained_layer(bank.shape[1])
    adjacency = graph.bank_adjacency(bank, 3, 0.9999)  # only the duplicate pair links
    assert adjacency.sum() == 2 and adjacency[2, 3] == adjacency[3, 2] == 1
    mask = graph.neighbour_mask(queries @ bank.T, 3, 0.9999).float()
    assert mask.sum() == 1  # the query equal to bank node 5
    isolated = torch.ones(len(queries), dtype=torch.bool)
    isolated[1] = False
    with torch.no_grad():
        out = layer(queries, mask, layer.bank_messages(bank, adjacency))
        alone = layer.up(F.relu(layer.transform(queries) + layer.gcn_bias))
    torch.testing.assert_close(out[isolated], (queries + 0.7 * alone)[isolated])


def test_bank_adjacency_is_symmetric_without_self_loops():
    bank, _ = random_graph(1, n_bank=30)
    adjacency = graph.bank_adjacency(bank, 4, 0.1)
    assert torch.equal(adjacency, adjacency.T)
    assert adjacency.diagonal().sum() == 0
    similarity = bank @ bank.T
    rows, cols = adjacency.nonzero().T
    assert (similarity[rows, cols] > 0.1).all()


def test_untrained_layer_returns_its_input():
    bank, queries = random_graph(2)
    layer = GraphAdapterLayer(bank.shape[1], 4, alpha=1.0)
    adjacency = graph.bank_adjacency(bank, 3, 0.0)
    mask = graph.neighbour_mask(queries @ bank.T, 3, 0.0).float()
    assert torch.equal(layer(queries, mask, layer.bank_messages(bank, adjacency)), queries)
