"""Dense graph algebra of GA-Net: node features, the kNN-and-threshold neighbourhood, and
GCN propagation from a fixed memory bank, with nothing an engine cannot compile (no
NonZero, no scatter, TopK with a constant K).

The graph has two kinds of nodes. Bank nodes (class nodes and stored training nodes) link
to one another, symmetrically. A query links to bank nodes only, by directed edges bank ->
query, so no query ever changes a bank node's degree or features: a query's output is the
same whatever else is in its batch. With self-loops and symmetric normalisation
(Kipf-Welling), a query q with bank neighbours N(q) gets

    out_q = h_q / d_q + d_q^{-1/2} * sum_{j in N(q)} d_j^{-1/2} h_j + b,   d_q = 1 + |N(q)|

where d_j is bank node j's degree in the bank graph (with its self-loop). The bank-side
factor d_j^{-1/2} h_j is constant at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Below any cosine and any threshold: a similarity set to this never makes an edge.
NO_EDGE = -2.0


def node_features(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Shapes: image [B, Di], text [B, Dt] -> nodes [B, Di + Dt], unit norm.

    Each modality is normalised first, so cosine similarity between nodes is the mean of
    the image cosine and the text cosine.
    """
    return torch.cat([F.normalize(image, dim=-1), F.normalize(text, dim=-1)], -1) / 2**0.5


def neighbour_mask(similarity: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """Shapes: similarity [Q, N] -> bool [Q, N]: the k most similar columns AND above tau.

    The k-th value comparison stands in for a scatter of top-k indices; a tie at the k-th
    value admits every tied column (more than k), the same in every form.
    """
    k = min(k, similarity.shape[-1])
    if k == 0:
        return torch.zeros_like(similarity, dtype=torch.bool)
    kth = similarity.topk(k, dim=-1).values[..., -1:]
    return (similarity >= kth) & (similarity > tau)


def bank_adjacency(bank: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """Shapes: bank nodes [N, D] (unit norm) -> symmetric 0/1 adjacency [N, N], no self-loops.

    Each node picks its k nearest other nodes above tau; an edge exists when either end
    picked it.
    """
    eye = torch.eye(len(bank), dtype=torch.bool, device=bank.device)
    similarity = (bank @ bank.T).masked_fill(eye, NO_EDGE)
    picked = neighbour_mask(similarity, min(k, len(bank) - 1), tau) & ~eye
    return (picked | picked.T).to(bank.dtype)


def bank_messages(transformed: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """Shapes: transformed bank features h [N, r], adjacency [N, N] -> d^{-1/2} h [N, r]."""
    degree = 1 + adjacency.sum(-1, keepdim=True)
    return transformed * degree.rsqrt()


def propagate_queries(transformed: torch.Tensor, mask: torch.Tensor,
                      messages: torch.Tensor) -> torch.Tensor:
    """Shapes: query features h [B, r], mask [B, N] (0/1), bank messages [N, r] -> [B, r].

    The GCN aggregation of each query over itself and its bank neighbours (no bias).
    """
    degree = 1 + mask.sum(-1, keepdim=True)
    return transformed / degree + (mask @ messages) * degree.rsqrt()


def edge_index(bank_adjacency: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """The same graph as an edge list [2, E] over [bank nodes; queries], for message passing
    libraries (training form only: NonZero is fine there)."""
    bank_edges = bank_adjacency.nonzero().T.flip(0)  # (source, target), both directions
    query_edges = query_mask.nonzero().T.flip(0)  # (bank source, query target)
    query_edges = query_edges + torch.tensor([[0], [len(bank_adjacency)]],
                                             device=query_edges.device)
    return torch.cat([bank_edges, query_edges], dim=1)
