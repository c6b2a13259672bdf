"""The training loop: one readable function, nanoGPT-sized.

AdamW, cosine schedule with warm-up, gradient clipping, bf16 autocast on CUDA, seeded data
order, validation every epoch with best-checkpoint selection (never on test), checkpoints
that `resume` continues from with identical results, a NaN guard, metrics to JSONL and a
progress bar. The backbone is frozen, so images are decoded and preprocessed once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmdeploy.artifacts import RunDir, load_safetensors, save_safetensors
from mmdeploy.backbone import Backbone
from mmdeploy.data import Sample, Splits, read_image
from mmdeploy.errors import MmdeployError
from mmdeploy.runs import RunConfig, build_model

from .checkpoint import load_checkpoint, save_checkpoint, truncate_metrics
from .losses import EWC


@dataclass
class TrainResult:
    best_val_accuracy: float
    best_step: int
    test_accuracy: float
    steps: int
    seconds: float
    parameters: dict


def preprocess(samples: list[Sample], backbone: Backbone, desc: str) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """All images of a split as one pixel tensor [N, 3, H, W] and labels [N]."""
    chunks = []
    for start in tqdm(range(0, len(samples), 256), desc=desc, unit="batch", leave=False):
        images = [read_image(s) for s in samples[start:start + 256]]
        chunks.append(torch.from_numpy(backbone.preprocessor(images)))
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return torch.cat(chunks), labels


@torch.no_grad()
def accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits, _ = model(pixels[start:start + batch_size])
        correct += (logits.argmax(-1) == labels[start:start + batch_size]).sum().item()
    return correct / max(len(labels), 1)


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero: a pure function of the step (resume-safe)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(run: RunConfig, run_dir: RunDir, backbone: Backbone, splits: Splits,
          resume: bool = False) -> TrainResult:
    """Train `run.adapter` on `splits.train`, keep the best on `splits.val`, report test."""
    started = time.perf_counter()
    cfg = run.train
    torch.manual_seed(cfg.seed)
    model = build_model(run, backbone)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    train_x, train_y = preprocess(splits.train, backbone, "decode train")
    val_x, val_y = preprocess(splits.val, backbone, "decode val")
    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup_steps, total_steps)

    def task_loss(m, batch) -> torch.Tensor:
        logits, _ = m(batch[0].to(device))
        return F.cross_entropy(logits, batch[1].to(device))

    state = {"step": 0, "best_val": -1.0, "best_step": -1, "bad_steps": 0}
    ewc = None
    if resume:
        state, ewc = load_checkpoint(run_dir, model, optimizer, cfg.ewc_lambda)
        truncate_metrics(run_dir, state["step"])
    elif cfg.ewc_lambda > 0 and params:
        model.eval()
        ewc = EWC.estimate(model, _batches(train_x, train_y, cfg.batch_size), task_loss,
                           cfg.ewc_lambda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    progress = tqdm(total=total_steps, initial=state["step"], desc=f"train {run.adapter}",
                    unit="step")
    while state["step"] < total_steps and params:
        epoch, offset = divmod(state["step"], steps_per_epoch)
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(
            cfg.seed * 100_003 + epoch))
        for index in range(offset, steps_per_epoch):
            if state["step"] >= total_steps:
                break
            model.train()
            lr = learning_rate(state["step"], cfg.lr, warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch_ids = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
            with autocast:
                loss = task_loss(model, (train_x[batch_ids], train_y[batch_ids]))
                loss = loss + model.auxiliary_loss().to(loss.device)
                if ewc is not None:
                    loss = loss + ewc.penalty(model)
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                state["bad_steps"] = 0
            else:
                state["bad_steps"] += 1
                if state["bad_steps"] > cfg.max_nan_steps:
                    raise MmdeployError(f"training diverged: {state['bad_steps']} non-finite "
                                        f"losses in a row at step {state['step']}; lower --lr")
                grad_norm = torch.tensor(float("nan"))
            state["step"] += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            _log(run_dir, {"step": state["step"], "epoch": epoch, "loss": loss.item(),
                           "lr": lr, "grad_norm": float(grad_norm)})
            end_of_epoch = index == steps_per_epoch - 1 or state["step"] == total_steps
            if end_of_epoch:
                _validate(model, run_dir, val_x, val_y, cfg.batch_size, state, epoch)
            if end_of_epoch or state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint(run_dir, model, optimizer, state, ewc)
    progress.close()
    if not params:  # nothing to train (zero-shot): the untrained model is the result
        _validate(model, run_dir, val_x, val_y, cfg.batch_size, state, 0)
    return _finish(run_dir, backbone, splits, state, started, model, cfg.batch_size)


def _finish(run_dir, backbone, splits, state, started, model, batch_size) -> TrainResult:
    """Test accuracy of the best checkpoint, once, at the very end."""
    model.load_adapter_state_dict(load_safetensors(run_dir.weights_path))
    test_x, test_y = preprocess(splits.test, backbone, "decode test")
    test_accuracy = accuracy(model, test_x, test_y, batch_size)
    seconds = time.perf_counter() - started
    _log(run_dir, {"event": "test", "step": state["step"], "best_step": state["best_step"],
                   "val_accuracy": state["best_val"], "test_accuracy": test_accuracy})
    return TrainResult(state["best_val"], state["best_step"], test_accuracy, state["step"],
                       seconds, model.parameter_report())


def _validate(model, run_dir: RunDir, val_x, val_y, batch_size: int, state: dict,
              epoch: int) -> None:
    val_accuracy = accuracy(model, val_x, val_y, batch_size)
    _log(run_dir, {"event": "val", "step": state["step"], "epoch": epoch,
                   "val_accuracy": val_accuracy})
    if val_accuracy > state["best_val"]:
        state["best_val"], state["best_step"] = val_accuracy, state["step"]
        save_safetensors(run_dir.weights_path, model.adapter_state_dict())


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for start in range(0, len(y), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


def _log(run_dir: RunDir, record: dict) -> None:
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
             for k, v in record.items()}
    with open(run_dir.metrics_path, "a") as handle:
        handle.write(json.dumps(clean) + "\n")
