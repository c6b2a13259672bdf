"""GA-Net attached to a frozen backbone: sample and class nodes, a memory bank, a linear head.

A node is [image feature ; text feature] (`graph.node_features`): a sample's text is its
caption, or the empty caption when it has none (as when serving images alone); a class
node is [mean image feature of the class's training samples ; class-prompt feature]. The
memory bank is the C class nodes plus up to `bank_size` training nodes, chosen from the
training split (class-balanced, seeded) before training, so the adapter trains, is
validated and is served with one and the same bank; it is stored in the run as
`adapter_bank.safetensors`. A query links to its bank neighbours only (see `graph`).

The linear head starts as the backbone's zero-shot classifier when the towers share an
embedding space (its image half holds the scaled class-prompt embeddings), so with the
zero-initialised up-projection the untrained model equals the frozen one.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmdeploy.backbone import Backbone

from ..base import AdaptedModel
from . import graph
from .config import GANetConfig
from .layer import GraphAdapterLayer

# In training, a query's own copy in the bank (its exact node feature) is not a neighbour:
# at inference a query is never in the bank, and training should look the same.
_OWN_COPY = 1 - 1e-5


class GANetModel(AdaptedModel):
    config_class = GANetConfig
    uses_cosine_head = False
    uses_captions = True
    needs_bank = True

    @classmethod
    def fitted_defaults(cls, backbone: Backbone) -> dict[str, tuple[Any, str]]:
        width = backbone.image_embed_dim + backbone.text_embed_dim
        return {"rank": (min(GANetConfig.rank, width),
                         f"is wider than the {width}-wide node features it is a bottleneck of")}

    def __init__(self, backbone: Backbone, config: GANetConfig, class_names: list[str],
                 prompt_template: str):
        super().__init__(backbone, config, class_names, prompt_template)
        image_dim, text_dim = backbone.image_embed_dim, backbone.text_embed_dim
        dim = image_dim + text_dim
        self.adapter = GraphAdapterLayer(dim, config.rank, config.alpha)
        self.classifier = nn.Linear(dim, len(class_names))
        with torch.no_grad():
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)
            if backbone.shared_space:  # start as the towers' own zero-shot classifier
                prompts = F.normalize(self.encode_prompts()[0], dim=-1)
                scale = torch.tensor(float(backbone.logit_scale_init)).exp()
                self.classifier.weight[:, :image_dim] = prompts * scale * 2**0.5
        self.use_pyg = config.message_passing == "pyg" or (
            config.message_passing == "auto"
            and importlib.util.find_spec("torch_geometric") is not None)
        self.register_buffer("bank_nodes", torch.zeros(0, dim), persistent=False)
        self.register_buffer("bank_adjacency", torch.zeros(0, 0), persistent=False)
        self._caption_cache: dict[str, torch.Tensor] = {}

    # -- the memory bank -------------------------------------------------------------------
    @torch.no_grad()
    def build_bank(self, pixels: torch.Tensor, labels: torch.Tensor, captions: list[str],
                   seed: int, batch_size: int = 64) -> None:
        """Class nodes from all training samples, plus up to `bank_size` sample nodes."""
        device = self.classifier.weight.device
        image = torch.cat([self.image_features(pixels[i:i + batch_size].to(device))
                           for i in range(0, len(pixels), batch_size)])
        self.bank_from(image, self.caption_features(captions, len(image)), labels.to(device),
                       seed)

    def bank_from(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                  seed: int) -> None:
        """The bank from the training samples' image [N, Di] and text [N, Dt] features: a
        class node per class (its mean image; its prompt), then up to `bank_size` samples."""
        samples = graph.node_features(image, text)
        class_image = torch.stack([image[labels == c].mean(0)
                                   for c in range(len(self.class_names))])
        classes = graph.node_features(class_image, self.encode_prompts()[0])
        chosen = _balanced_choice(labels.cpu(), self.config.bank_size, seed)
        self.set_bank(torch.cat([classes, samples[chosen.to(image.device)]]))

    def set_bank(self, nodes: torch.Tensor) -> None:
        self.bank_nodes = nodes.detach().clone()
        self.bank_adjacency = graph.bank_adjacency(self.bank_nodes, self.config.k,
                                                   self.config.tau)

    def bank_state_dict(self) -> dict[str, torch.Tensor]:
        return {"nodes": self.bank_nodes.contiguous()}

    def load_bank_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        nodes = state.get("nodes")
        expected = (len(self.class_names), self.bank_nodes.shape[1])
        if nodes is None or nodes.ndim != 2 or nodes.shape[1] != expected[1] \
                or len(nodes) < expected[0]:
            shape = None if nodes is None else tuple(nodes.shape)
            raise KeyError(f"bank 'nodes' has shape {shape}; expected [>= {expected[0]}, "
                           f"{expected[1]}]")
        self.set_bank(nodes.to(self.bank_nodes))

    def clear_caches(self) -> None:
        super().clear_caches()
        self._caption_cache = {}

    # -- the forward pass ------------------------------------------------------------------
    def caption_features(self, captions: list[str] | None, batch: int) -> torch.Tensor:
        """Text features [B, Dt] of the samples' captions ("" or None: the empty caption);
        a constant buffer once deployed. The text tower is frozen, so features are cached."""
        if self.deployed:
            return self.frozen_empty_text.expand(batch, -1)
        captions = captions if captions is not None else [""] * batch
        missing = sorted({c for c in captions if c not in self._caption_cache})
        if missing:
            with torch.no_grad():
                features = self.backbone.encode_text(self.backbone.tokenize(missing))[0]
            self._caption_cache.update(zip(missing, features, strict=True))
        return torch.stack([self._caption_cache[c] for c in captions])

    def encode_images(self, pixel_values: torch.Tensor,
                      captions: list[str] | None = None) -> torch.Tensor:
        """Shapes: pixel_values [B, 3, H, W] -> adapted query nodes [B, Di + Dt]."""
        image = self.image_features(pixel_values)
        # shape[0], not len(): len() would freeze the exported batch size
        return self.adapt_nodes(graph.node_features(
            image, self.caption_features(captions, image.shape[0])))

    def adapt_nodes(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: query nodes [B, Di + Dt] -> adapted query nodes [B, Di + Dt]."""
        if len(self.bank_nodes) == 0:
            raise RuntimeError("GA-Net has no memory bank: build_bank() or load one first")
        similarity = x @ self.bank_nodes.T
        if self.training:
            similarity = similarity.masked_fill(similarity > _OWN_COPY, graph.NO_EDGE)
        mask = graph.neighbour_mask(similarity, self.config.k, self.config.tau).to(x.dtype)
        if self.deployed:
            return self.adapter(x, mask, self.frozen_bank_messages)
        if self.use_pyg:
            return self.adapter.forward_pyg(x, mask, self.bank_nodes, self.bank_adjacency)
        return self.adapter(x, mask, self.adapter.bank_messages(self.bank_nodes,
                                                                self.bank_adjacency))

    def head(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.classifier(embeddings)

    def freeze_adapter(self) -> None:
        """Bake the bank side (W_down, W_gcn and the bank's normalisation) and the empty
        caption's feature into constants: serving computes query rows only."""
        self.register_buffer("frozen_empty_text", self.caption_features([""], 1).detach(),
                             persistent=False)
        self.register_buffer("frozen_bank_messages",
                             self.adapter.bank_messages(self.bank_nodes,
                                                        self.bank_adjacency).detach(),
                             persistent=False)


def _balanced_choice(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Up to `limit` sample indices, round-robin over classes in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    per_class = [order[labels[order] == c] for c in labels.unique().tolist()]
    rounds = max((len(ids) for ids in per_class), default=0)
    picked = [ids[r:r + 1] for r in range(rounds) for ids in per_class]
    return torch.cat(picked)[:limit] if picked else torch.zeros(0, dtype=torch.long)
