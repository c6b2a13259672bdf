"""Defaults that depend on the backbone fit the tower they are given (with one note each);
only a value the user typed is refused. Separate towers of 3 and 12 image blocks, saved as
local checkpoints (the `towers` fixture)."""

from __future__ import annotations

import pytest

from mmdeploy.backbone import load_backbone
from mmdeploy.config import BackboneConfig
from mmdeploy.models.baselines.model import LoRAModel
from mmdeploy.models.ganet.model import GANetModel
from mmdeploy.models.hmmoe.model import HMMoEModel


@pytest.fixture(scope="module")
def specs(towers) -> dict[int, str]:
    return {depth: towers(depth) for depth in (3, 12)}


def backbone(spec: str):
    return load_backbone(BackboneConfig(spec=spec))


def test_hmmoe_layers_fit_a_shallow_tower_and_a_typed_value_is_refused(specs):
    shallow = backbone(specs[3])
    config, notes = HMMoEModel.fit_options(shallow, {})
    assert config.num_layers == 3
    assert notes == ["num_layers = 3 (the default 4 is more than the image tower's 3 blocks)"]
    assert len(HMMoEModel(shallow, config, ["a", "b"], "{}").adapters) == 3
    typed, notes = HMMoEModel.fit_options(backbone(specs[3]), {"num_layers": 4})
    assert typed.num_layers == 4 and notes == []
    with pytest.raises(ValueError, match=r"num_layers must be 1\.\.3 for this image tower"):
        HMMoEModel(backbone(specs[3]), typed, ["a", "b"], "{}")


def test_a_deep_tower_keeps_the_defaults(specs):
    deep = backbone(specs[12])
    assert HMMoEModel.fit_options(deep, {})[0].num_layers == 4
    assert HMMoEModel.fit_options(deep, {})[1] == []
    assert LoRAModel.fit_options(deep, {}) == (LoRAModel.config_class(), [])  # q_proj, v_proj


def test_ganet_rank_fits_the_node_width(specs):
    config, notes = GANetModel.fit_options(backbone(specs[3]), {})
    width = 48 + 40  # image and text features, concatenated: no shared projection here
    assert config.rank == width
    assert notes == [f"rank = {width} (the default 512 is wider than the {width}-wide node "
                     "features it is a bottleneck of)"]
    assert GANetModel.fit_options(backbone(specs[3]), {"rank": 512})[0].rank == 512


def test_train_says_what_it_fitted(cli, specs, tmp_path, expect_error):
    run = tmp_path / "shallow"
    result = cli(["train", "--adapter", "hmmoe", "--backbone", specs[3], "--out", run,
                  "--max-steps", "1", "--shots", "1"])
    assert result.code == 0, str(result)
    assert ("note: adapter 'hmmoe': num_layers = 3 (the default 4 is more than the image "
            "tower's 3 blocks)") in result.stderr
    typed = cli(["train", "--adapter", "hmmoe", "--backbone", specs[3], "--out",
                 tmp_path / "typed", "--max-steps", "1", "--shots", "1",
                 "--option", "num_layers=4"])
    expect_error(typed, "num_layers must be 1..3 for this image tower")
