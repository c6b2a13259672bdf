"""Checkpoints keep every RNG state `--resume` needs: the CPU generator's and, on a CUDA
machine, each device's (HMMoE's router noise draws from the GPU's). No GPU here: the CUDA
calls are replaced by fakes that hold one state per pretended device."""

import pytest
import torch

from mmdeploy.artifacts import RunDir, load_safetensors
from mmdeploy.trainers.checkpoint import load_checkpoint, save_checkpoint


class TinyAdapter(torch.nn.Linear):
    """The part of an adapted model a checkpoint touches."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().contiguous() for name, p in self.named_parameters()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


class FakeCuda:
    """`devices` CUDA generators (none: CUDA is not available), each state 16 bytes."""

    def __init__(self, monkeypatch, devices: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.states = [torch.randint(0, 256, (16,), dtype=torch.uint8, generator=generator)
                       for _ in range(devices)]
        self.restored: list[torch.Tensor] | None = None
        monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self._set)

    def _set(self, states) -> None:
        self.restored = list(states)


def save(run_dir: RunDir) -> tuple[TinyAdapter, torch.optim.Optimizer]:
    """Checkpoint a fresh model at step 1; returns what `load_checkpoint` restores into."""
    model = TinyAdapter(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(run_dir, model, optimizer, {"step": 1}, ewc=None)
    return model, optimizer


def checkpoint_tensors(run_dir: RunDir) -> dict[str, torch.Tensor]:
    return load_safetensors(run_dir.checkpoint_dir / "state.safetensors")


def test_cpu_and_every_cuda_rng_state_are_saved_and_restored(monkeypatch, tmp_path):
    run_dir = RunDir(tmp_path)
    cuda = FakeCuda(monkeypatch, devices=2, seed=0)
    model, optimizer = save(run_dir)
    saved_cpu = torch.get_rng_state()
    tensors = checkpoint_tensors(run_dir)
    assert {k for k in tensors if k.startswith("rng.")} == {"rng.torch", "rng.cuda.0",
                                                           "rng.cuda.1"}
    assert all(torch.equal(tensors[f"rng.cuda.{i}"], cuda.states[i]) for i in range(2))

    torch.rand(100)  # the generators move on after the checkpoint
    load_checkpoint(run_dir, model, optimizer, ewc_lambda=0.0)
    assert torch.equal(torch.get_rng_state(), saved_cpu)
    assert [s.tolist() for s in cuda.restored] == [s.tolist() for s in cuda.states]


@pytest.mark.parametrize(("saved_on", "resumed_on", "restored"), [
    (2, 1, 1),  # the first device's state; the other device is not there
    (1, 2, 1),  # the second device keeps its current state
    (0, 2, None),  # a checkpoint from a CPU run: nothing to restore on the GPUs
    (2, 0, None),  # resumed on a CPU machine: the CUDA states are not needed
])
def test_cuda_rng_states_are_restored_for_the_devices_both_machines_have(
        monkeypatch, tmp_path, saved_on, resumed_on, restored):
    run_dir = RunDir(tmp_path)
    with monkeypatch.context() as patch:
        saving = FakeCuda(patch, devices=saved_on, seed=0)
        model, optimizer = save(run_dir)
    resuming = FakeCuda(monkeypatch, devices=resumed_on, seed=1)
    state, _ = load_checkpoint(run_dir, model, optimizer, ewc_lambda=0.0)
    assert state == {"step": 1}
    if restored is None:
        assert resuming.restored is None
    else:
        assert [s.tolist() for s in resuming.restored] == \
            [s.tolist() for s in saving.states[:restored]]


@pytest.mark.filterwarnings("ignore:.*to a meta parameter")  # the weights: a no-op on meta
def test_moments_and_ewc_are_restored_onto_the_parameters_device(tmp_path):
    """safetensors loads on the CPU; a CUDA model's AdamW step and EWC penalty refuse CPU
    state. A model on torch's `meta` device stands in for the GPU: a tensor left on the CPU
    shows without one."""
    from mmdeploy.trainers.losses import EWC

    run_dir = RunDir(tmp_path)
    model = TinyAdapter(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ewc = EWC({n: torch.ones_like(p) for n, p in model.named_parameters()},
              {n: p.detach().clone() for n, p in model.named_parameters()}, strength=1.0)
    save_checkpoint(run_dir, model, optimizer, {"step": 1}, ewc)

    on_meta = TinyAdapter(3, 2, device="meta")
    meta_optimizer = torch.optim.AdamW(on_meta.parameters())
    _, restored = load_checkpoint(run_dir, on_meta, meta_optimizer, ewc_lambda=1.0)
    for p in on_meta.parameters():
        state = meta_optimizer.state[p]
        assert state["exp_avg"].is_meta and state["exp_avg_sq"].is_meta
        assert state["step"].device.type == "cpu"  # AdamW's own placement for its count
    assert all(t.is_meta for t in [*restored.fisher.values(), *restored.reference.values()])
    assert restored.penalty(on_meta).is_meta
