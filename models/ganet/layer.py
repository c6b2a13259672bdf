"""The graph adapter layer: a bottleneck around one GCN, residual onto the node features."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import graph


class GraphAdapterLayer(nn.Module):
    """X' = X + alpha * W_up relu(GCN(A, W_down X)), evaluated for query nodes.

    Shapes:
        queries x [B, D], query mask [B, N] (0/1, which bank nodes each query links to),
        bank nodes [N, D] and bank adjacency [N, N] (or the frozen bank messages [N, r])
        -> adapted queries [B, D]

    The GCN weight and bias belong to this layer in both forms: the torch_geometric form
    calls `GCNConv` with them (`torch.func.functional_call`), the dense form multiplies by
    them. `up` starts at zero, so an untrained layer returns its input exactly.
    """

    def __init__(self, dim: int, rank: int, alpha: float):
        super().__init__()
        self.alpha = alpha
        self.down = nn.Linear(dim, rank)
        self.gcn_weight = nn.Parameter(torch.empty(rank, rank))
        self.gcn_bias = nn.Parameter(torch.zeros(rank))
        nn.init.xavier_uniform_(self.gcn_weight)  # GCNConv's glorot initialisation
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: nodes [n, D] -> the GCN's node-wise linear part [n, r]."""
        return self.down(x) @ self.gcn_weight.T

    def bank_messages(self, bank: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """Shapes: bank [N, D], adjacency [N, N] -> [N, r]; constant once deployed."""
        return graph.bank_messages(self.transform(bank), adjacency)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                messages: torch.Tensor) -> torch.Tensor:
        """Dense form (what exports): `messages` from `bank_messages`."""
        aggregated = graph.propagate_queries(self.transform(x), mask, messages)
        return self._residual(x, aggregated + self.gcn_bias)

    def forward_pyg(self, x: torch.Tensor, mask: torch.Tensor, bank: torch.Tensor,
                    adjacency: torch.Tensor) -> torch.Tensor:
        """torch_geometric form: GCNConv over the edge list of [bank nodes; queries]."""
        nodes = self.down(torch.cat([bank, x]))
        edges = graph.edge_index(adjacency, mask)
        params = {"lin.weight": self.gcn_weight, "bias": self.gcn_bias}
        out = torch.func.functional_call(_gcn_conv(self.gcn_weight.shape[0]), params,
                                         (nodes, edges))
        return self._residual(x, out[len(bank):])

    def _residual(self, x: torch.Tensor, aggregated: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.up(F.relu(aggregated))


@functools.cache
def _gcn_conv(rank: int) -> nn.Module:
    """GCNConv (self-loops, symmetric normalisation) as a template: `functional_call` swaps
    in the layer's weights at every call, so the template's own are never used or saved."""
    from torch_geometric.nn import GCNConv

    return GCNConv(rank, rank)
