"""A deploy form that pins the batch size is refused at export, in one line, not shipped."""

import pytest
import torch
from torch import nn

from mmdeploy.errors import MmdeployError
from mmdeploy.exporters.onnx import export_onnx


class PinsTheBatch(nn.Module):
    """`len()` of a traced tensor makes torch.export specialise the batch size; the dynamo
    ONNX exporter then falls back to a fixed-shape graph without raising."""

    def forward(self, pixel_values):
        pooled = pixel_values.mean((1, 2, 3))[:, None]
        return pooled + torch.zeros(len(pixel_values), 3), pooled


class KeepsTheBatch(PinsTheBatch):
    def forward(self, pixel_values):
        pooled = pixel_values.mean((1, 2, 3))[:, None]
        return pooled + torch.zeros(pixel_values.shape[0], 3), pooled


def test_a_pinned_batch_is_refused(tmp_path):
    with pytest.raises(MmdeployError, match="fixed batch of 2.*len\\(\\) of a tensor"):
        export_onnx(PinsTheBatch().eval(), tmp_path / "m.onnx", (8, 8), 1, 16, 18)


def test_a_dynamic_batch_exports(tmp_path):
    info = export_onnx(KeepsTheBatch().eval(), tmp_path / "m.onnx", (8, 8), 1, 16, 18)
    assert info["inputs"][0]["shape"][0] == "batch"
