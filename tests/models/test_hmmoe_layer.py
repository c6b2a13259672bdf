"""HMMoE layer: zero init, dispatch == deploy form, training-only noise and loss, config, ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim

from mmdeploy.errors import ConfigError
from mmdeploy.models.hmmoe.config import HMMoEConfig
from mmdeploy.models.hmmoe.experts import EXPERTS
from mmdeploy.models.hmmoe.layer import HMMoELayer

DIM, CONTEXT_DIM, RANK, TOKENS, CONTEXT_TOKENS = 32, 24, 8, 7, 5
NUM_EXPERTS = len(HMMoEConfig().experts)
DYNAMIC_OPS = {"NonZero", "Loop", "If", "ScatterND", "ScatterElements"}


def make_layer(seed: int = 0, randomise: bool = True, **options) -> HMMoELayer:
    """A layer in eval mode; `randomise` overwrites every weight (incl. zero-init ones)."""
    torch.manual_seed(seed)
    layer = HMMoELayer(DIM, CONTEXT_DIM, HMMoEConfig(rank=RANK, **options)).eval()
    if randomise:
        for parameter in layer.parameters():
            nn.init.normal_(parameter, std=0.2)
    return layer


def inputs(batch: int, context_batch: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TOKENS, DIM, generator=generator)
    return x, torch.randn(context_batch, CONTEXT_TOKENS, CONTEXT_DIM, generator=generator)


def run(layer: HMMoELayer, x: Tensor, context: Tensor, deploy_form: bool) -> Tensor:
    layer.deploy_form = deploy_form
    with torch.no_grad():
        return layer(x, context)


@pytest.mark.parametrize("name", list(EXPERTS))
def test_every_expert_outputs_exactly_zero_at_init(name: str) -> None:
    torch.manual_seed(0)
    expert = EXPERTS[name](DIM, RANK)
    x, ctx = torch.randn(3, TOKENS, DIM), torch.randn(1, CONTEXT_TOKENS, DIM)
    assert torch.equal(expert(x, ctx), torch.zeros_like(x))


@pytest.mark.parametrize("router", ["sample", "token"])
@pytest.mark.parametrize("deploy_form", [False, True])
def test_layer_outputs_exactly_zero_at_init(router: str, deploy_form: bool) -> None:
    layer = make_layer(randomise=False, router=router).train()
    x, context = inputs(batch=4, context_batch=4)
    layer.deploy_form = deploy_form
    assert torch.equal(layer(x, context), torch.zeros_like(x))


@pytest.mark.parametrize("context_batch", ["one", "same"])
@pytest.mark.parametrize("router", ["sample", "token"])
@pytest.mark.parametrize("top_k", [1, 2, NUM_EXPERTS])
def test_dispatch_form_equals_deploy_form_in_eval(top_k: int, router: str, context_batch: str):
    layer = make_layer(top_k=top_k, router=router)
    for batch in (1, 5, 32):
        x, context = inputs(batch, 1 if context_batch == "one" else batch)
        dispatched = run(layer, x, context, deploy_form=False)
        deployed = run(layer, x, context, deploy_form=True)
        assert dispatched.abs().max() > 0.1
        torch.testing.assert_close(dispatched, deployed, rtol=0, atol=1e-5)


def test_router_noise_only_in_training() -> None:
    layer = make_layer(router_noise=1.0)
    x, context = inputs(batch=8, context_batch=1)
    assert torch.equal(run(layer, x, context, False), run(layer, x, context, False))
    layer.train()
    assert not torch.equal(run(layer, x, context, False), run(layer, x, context, False))
    quiet = make_layer(router_noise=0.0).train()
    assert torch.equal(run(quiet, x, context, False), run(quiet, x, context, False))


@pytest.mark.parametrize("router", ["sample", "token"])
def test_aux_loss_positive_in_training_zero_in_eval(router: str) -> None:
    layer = make_layer(router=router, balance_loss_weight=0.01).train()
    x, context = inputs(batch=6, context_batch=1)
    layer(x, context)
    assert layer.aux_loss.ndim == 0
    assert layer.aux_loss.item() > 0
    assert layer.aux_loss.requires_grad
    layer.eval()
    layer(x, context)
    assert layer.aux_loss.item() == 0


@pytest.mark.parametrize("randomise", [False, True])
def test_gradients_reach_the_selected_experts(randomise: bool) -> None:
    layer = make_layer(randomise=randomise, top_k=2, router_noise=0.0).train()
    x, context = inputs(batch=1, context_batch=1)
    with torch.no_grad():
        logits = layer.router(x, layer.context_proj(context))
    selected = set(logits.topk(2, dim=-1).indices.flatten().tolist())
    assert len(selected) == 2
    loss = (layer(x, context) * torch.randn_like(x)).sum() + layer.aux_loss
    loss.backward()
    assert layer.router.image_logits.weight.grad.abs().sum() > 0
    for index, expert in enumerate(layer.experts):
        if index not in selected:
            assert all(p.grad is None for p in expert.parameters())
        elif randomise:
            assert all(p.grad.abs().sum() > 0 for p in expert.parameters())
        else:  # zero-initialised output projection: only it gets a gradient at first
            assert expert.up.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"experts": ("bottleneck", "mlp")}, "unknown expert 'mlp'"),
        ({"experts": ()}, "at least one expert"),
        ({"top_k": 0}, "top_k = 0"),
        ({"top_k": 5}, "top_k = 5"),
        ({"experts": ("bottleneck",), "top_k": 2}, "top_k = 2"),
        ({"router": "tokens"}, "router = 'tokens'"),
        ({"rank": 0}, "rank = 0"),
        ({"num_layers": 0}, "num_layers = 0"),
        ({"router_noise": -1.0}, "router_noise = -1.0"),
    ],
)
def test_config_rejects_bad_values(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HMMoEConfig(**options)
    with pytest.raises(ConfigError, match=message):
        HMMoEConfig.from_dict({**HMMoEConfig().to_dict(), **options})


def test_config_json_round_trip() -> None:
    config = HMMoEConfig(rank=4, experts=["bottleneck", "affine_fusion"], top_k=1, router="token")
    assert config.experts == ("bottleneck", "affine_fusion")
    assert HMMoEConfig.from_dict(config.to_dict()) == config
    assert HMMoEConfig.from_json(config.to_json()) == config
    assert HMMoEConfig.from_json(HMMoEConfig().to_json()) == HMMoEConfig()


class FrozenContextLayer(nn.Module):
    """The deploy form with its text context baked in as a constant, as the exporter does."""

    def __init__(self, layer: HMMoELayer, context: Tensor):
        super().__init__()
        self.layer = layer
        self.register_buffer("context", context, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, self.context)


def all_op_types(model: onnx.ModelProto) -> set[str]:
    nodes = list(model.graph.node) + [n for function in model.functions for n in function.node]
    return {node.op_type for node in nodes}


@pytest.mark.parametrize(
    ("top_k", "router"), [(2, "sample"), (NUM_EXPERTS, "sample"), (2, "token")]
)
def test_deploy_form_exports_to_onnx_with_a_dynamic_batch(tmp_path, top_k: int, router: str):
    layer = make_layer(top_k=top_k, router=router)
    layer.deploy_form = True
    _, context = inputs(batch=1, context_batch=1)
    wrapper = FrozenContextLayer(layer, context).eval()
    path = tmp_path / "hmmoe.onnx"
    torch.onnx.export(
        wrapper,
        (inputs(batch=4, context_batch=1, seed=2)[0],),
        str(path),
        dynamo=True,
        opset_version=18,
        dynamic_shapes={"x": {0: Dim("batch", min=1, max=256)}},
        input_names=["x"],
        output_names=["y"],
        external_data=False,
        verbose=False,
    )
    model = onnx.load(str(path))
    assert not all_op_types(model) & DYNAMIC_OPS
    assert ("TopK" in all_op_types(model)) == (top_k < NUM_EXPERTS)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 17):
        x, _ = inputs(batch, context_batch=1, seed=batch)
        (onnx_output,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            expected = wrapper(x).numpy()
        assert onnx_output.shape == expected.shape
        np.testing.assert_allclose(onnx_output, expected, rtol=0, atol=1e-5)
