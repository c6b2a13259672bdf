"""Training checkpoints as safetensors + JSON (never pickle), for an exact `--resume`.

`checkpoint/state.safetensors` holds the adapter weights, AdamW's moments, the EWC
reference and Fisher, and the RNG states: the CPU generator's and, on a CUDA machine, each
device's (HMMoE's router noise draws from the generator of the device it runs on);
`checkpoint/state.json` holds the step and best-so-far bookkeeping. The data order is a
function of (seed, epoch), so the step alone says where to continue.
"""

from __future__ import annotations

import json

import torch

from mmdeploy.artifacts import (
    RunDir,
    atomic_write_json,
    load_safetensors,
    read_json,
    save_safetensors,
)
from mmdeploy.errors import ArtifactError

from .losses import EWC


def save_checkpoint(run_dir: RunDir, model, optimizer: torch.optim.Optimizer, state: dict,
                    ewc: EWC | None) -> None:
    run_dir.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.adapter_state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).clone()
    if ewc is not None:
        tensors.update(ewc.state_dict())
    tensors.update(_rng_states())
    save_safetensors(run_dir.checkpoint_dir / "state.safetensors", tensors)
    # state.json last: it names a step only once the tensors of that step are on disk.
    atomic_write_json(run_dir.checkpoint_dir / "state.json", state)


def load_checkpoint(run_dir: RunDir, model, optimizer: torch.optim.Optimizer,
                    ewc_lambda: float) -> tuple[dict, EWC | None]:
    state_path = run_dir.checkpoint_dir / "state.json"
    if not state_path.exists():
        raise ArtifactError(f"{run_dir.root}: no checkpoint to resume from ({state_path} missing)")
    state = read_json(state_path)
    tensors = load_safetensors(run_dir.checkpoint_dir / "state.safetensors")
    model.load_adapter_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    # safetensors loads on the CPU: the moments and the EWC tensors go to their parameter's
    # device (a CUDA step refuses mixed devices); AdamW keeps its `step` count on the CPU.
    for name, p in params.items():
        moments = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                   if k.startswith(f"optim.{name}.") and k.count(".") == name.count(".") + 2}
        if moments:
            optimizer.state[p] = {key: value if key == "step" else value.to(p.device)
                                  for key, value in moments.items()}
    _restore_rng_states(tensors)
    ewc = None
    if ewc_lambda > 0:
        ewc = EWC.from_state_dict({k: v.to(params[k.split(".", 2)[2]].device)
                                   for k, v in tensors.items() if k.startswith("ewc.")},
                                  ewc_lambda)
    return state, ewc


def _rng_states() -> dict[str, torch.Tensor]:
    """`rng.torch` (CPU) and `rng.cuda.<device>` for each CUDA device, when there are any."""
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"rng.cuda.{index}": state
                       for index, state in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _restore_rng_states(tensors: dict[str, torch.Tensor]) -> None:
    """Restore what `_rng_states` saved. CUDA states go to the devices both machines have:
    a checkpoint from a CPU run (no CUDA states) or from a machine with another device count
    still loads; a device the checkpoint has no state for keeps its current one."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = []
    while f"rng.cuda.{len(cuda)}" in tensors:
        cuda.append(tensors[f"rng.cuda.{len(cuda)}"])
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def truncate_metrics(run_dir: RunDir, step: int) -> None:
    """Drop metric lines written after the checkpoint, so a resumed run logs each step once."""
    if not run_dir.metrics_path.exists():
        return
    kept = [line for line in run_dir.metrics_path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= step]
    run_dir.metrics_path.write_text("".join(line + "\n" for line in kept))
