"""Fixtures for the adapter tests: fresh tiny backbones from one per-session cache."""

import pytest

from mmdeploy.backbone import load_backbone
from mmdeploy.config import BackboneConfig


@pytest.fixture
def backbone_factory(tmp_path_factory):
    """`backbone_factory()`: a fresh tiny backbone (each adapter needs its own)."""
    cache = tmp_path_factory.getbasetemp() / "backbones"
    return lambda: load_backbone(BackboneConfig(cache_dir=str(cache)))
