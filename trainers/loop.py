"""The training loop: one readable function, nanoGPT-sized.

AdamW, cosine schedule with warm-up, gradient clipping, bf16 autocast on CUDA, seeded data
order, validation every epoch with best-checkpoint selection (never on test), checkpoints
that `resume` continues from with identical results, a NaN guard, metrics to JSONL and a
progress bar. The backbone is frozen, so images are decoded and preprocessed once, and the
frozen part of the model runs once per image (`frozen_cache`; `--no-cache` turns it off).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmdeploy.artifacts import RunDir, load_safetensors, save_safetensors
from mmdeploy.backbone import Backbone, torch_device
from mmdeploy.config import TrainConfig
from mmdeploy.data import Splits
from mmdeploy.errors import MmdeployError
from mmdeploy.runs import RunConfig, build_model

from . import vqa
from .checkpoint import load_checkpoint, save_checkpoint, truncate_metrics
from .frozen_cache import cached_split, check_split_forward
from .losses import EWC
from .split import Split, decode


@dataclass
class TrainResult:
    best_val_accuracy: float
    best_step: int
    test_accuracy: float
    steps: int
    parameters: dict
    phase_seconds: dict  # "prepare" (model, decoding, the frozen-prefix cache), "train", "test"

    @property
    def seconds(self) -> float:
        return sum(self.phase_seconds.values())


def logits_of(model, split: Split, device: str = "cpu") -> torch.Tensor:
    if split.input_ids is not None:  # vqa: image + question
        return model(split.inputs.to(device), split.input_ids.to(device),
                     split.attention_mask.to(device))[0]
    captions = split.captions if model.uses_captions else None
    return model(split.inputs.to(device), captions)[0]


@torch.no_grad()
def evaluate(model, split: Split, batch_size: int, device: str = "cpu") -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` on `split`."""
    model.eval()
    if split.image_index is not None and not model.image_reads_question:
        batches = vqa.logits_per_image(model, split, batch_size, device)
    else:
        batches = ((logits_of(model, batch, device), batch.labels)
                   for batch in split.batches(batch_size))
    correct, loss = 0, 0.0
    for logits, labels in batches:
        logits, labels = logits.float().cpu(), labels.cpu()
        correct += (logits.argmax(-1) == labels).sum().item()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
    return correct / max(len(split), 1), loss / max(len(split), 1)


def accuracy(model, split: Split, batch_size: int, device: str = "cpu") -> float:
    return evaluate(model, split, batch_size, device)[0]


class PhaseClock:
    """Seconds spent in each phase of a run, in order."""

    def __init__(self, first: str):
        self.seconds: dict[str, float] = {}
        self._phase, self._since = first, time.perf_counter()

    def begin(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[self._phase] = round(now - self._since, 2)
        self._phase, self._since = phase, now

    def stop(self) -> dict[str, float]:
        self.begin("")
        return self.seconds


def ewc_strength(run: RunConfig) -> float:
    """`train --ewc-lambda` when given, else the adapter's own default, else 0 (off)."""
    if run.train.ewc_lambda is not None:
        return run.train.ewc_lambda
    return getattr(run.typed_adapter_config(), "ewc_lambda", 0.0)


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero: a pure function of the step (resume-safe)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(run: RunConfig, run_dir: RunDir, backbone: Backbone, splits: Splits,
          resume: bool = False) -> TrainResult:
    """Train `run.adapter` on `splits.train`, keep the best on `splits.val`, report test."""
    clock = PhaseClock("prepare")
    cfg = run.train
    torch.manual_seed(cfg.seed)
    model = build_model(run, backbone)
    device = torch_device()
    model.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    train_split, val_split = _training_inputs(model, cfg, run_dir, backbone, splits, device,
                                              autocast)
    clock.begin("train")
    if model.needs_bank:  # deterministic: a resumed run rebuilds the very same bank
        if train_split.image_index is not None:  # vqa
            model.eval()
            vqa.build_bank(model, train_split, cfg.batch_size, device, cfg.seed)
        else:
            model.build_bank(train_split.inputs, train_split.labels, train_split.captions,
                             cfg.seed)
        save_safetensors(run_dir.bank_path, model.bank_state_dict(),
                         metadata={"adapter": type(model).__name__})
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    state = {"step": 0, "best_val": -1.0, "best_step": -1, "bad_steps": 0}
    if not params:  # nothing to train (zero-shot): the model as it is is the result
        _validate(model, run_dir, val_split, cfg.batch_size, state, 0, device)
        return _finish(run_dir, backbone, splits, state, clock, model, cfg.batch_size, device,
                       cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup_steps, total_steps)

    def task_loss(m, batch: Split) -> torch.Tensor:
        return F.cross_entropy(logits_of(m, batch, device), batch.labels.to(device))

    ewc = None
    ewc_lambda = ewc_strength(run)
    if resume:
        state, ewc = load_checkpoint(run_dir, model, optimizer, ewc_lambda)
        truncate_metrics(run_dir, state["step"])
    elif ewc_lambda > 0:
        model.eval()
        ewc = EWC.estimate(model, train_split.batches(cfg.batch_size), task_loss, ewc_lambda)

    progress = tqdm(total=total_steps, initial=state["step"], desc=f"train {run.adapter}",
                    unit="step")
    while state["step"] < total_steps:
        epoch, offset = divmod(state["step"], steps_per_epoch)
        order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(
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
                loss = task_loss(model, train_split.batch(batch_ids))
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
                _validate(model, run_dir, val_split, cfg.batch_size, state, epoch, device)
            if end_of_epoch or state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint(run_dir, model, optimizer, state, ewc)
    progress.close()
    return _finish(run_dir, backbone, splits, state, clock, model, cfg.batch_size, device,
                       cfg)


def _training_inputs(model, cfg: TrainConfig, run_dir: RunDir, backbone: Backbone,
                     splits: Splits, device: str, autocast) -> tuple[Split, Split]:
    """The training and validation splits as the model reads them: what its frozen prefix
    makes of each image, computed once (`frozen_cache`); pixels with `--no-cache`, or when
    the adapter changes the first block (LoRA)."""
    if not cfg.cache_features or model.first_adapted_block() is None:
        return (decode(splits.train, backbone, "decode train"),
                decode(splits.val, backbone, "decode val"))
    check_split_forward(model, splits.train, device)
    limit = cfg.cache_memory_mb * 2**20
    cached = [cached_split(model, samples, device, autocast, f"cache {name}",
                           run_dir.feature_cache_dir / f"{name}.bin", limit,
                           _store(cfg))
              for name, samples in (("train", splits.train), ("val", splits.val))]
    model.reads_cache = True
    return cached[0], cached[1]


def _store(cfg: TrainConfig) -> Path | None:
    return Path(cfg.feature_store).expanduser() if cfg.feature_store else None


def _finish(run_dir, backbone, splits, state, clock, model, batch_size,
            device, cfg: TrainConfig) -> TrainResult:
    """Test accuracy of the best checkpoint, once, at the very end, through the model's
    whole forward (never the cache); a vqa run's test split (easy-VQA's: 9,673 questions,
    each of which would run the whole image tower) goes through the frozen-prefix cache
    when training did, which `check_split_forward` found equal to the whole forward."""
    clock.begin("test")
    model.load_adapter_state_dict(load_safetensors(run_dir.weights_path))
    if splits.task == "vqa" and model.reads_cache:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
        test = cached_split(model, splits.test, device, autocast, "cache test",
                            run_dir.feature_cache_dir / "test.bin",
                            cfg.cache_memory_mb * 2**20, _store(cfg))
        model.reads_cache = True
    else:
        model.reads_cache = False
        test = decode(splits.test, backbone, "decode test")
    test_accuracy = accuracy(model, test, batch_size, device)
    model.reads_cache = False
    shutil.rmtree(run_dir.feature_cache_dir, ignore_errors=True)
    phases = clock.stop()
    _log(run_dir, {"event": "test", "step": state["step"], "best_step": state["best_step"],
                   "val_accuracy": state["best_val"], "test_accuracy": test_accuracy})
    return TrainResult(state["best_val"], state["best_step"], test_accuracy, state["step"],
                       model.parameter_report(), phases)


def _validate(model, run_dir: RunDir, val_split: Split, batch_size: int, state: dict,
              epoch: int, device: str) -> None:
    val_accuracy, val_loss = evaluate(model, val_split, batch_size, device)
    _log(run_dir, {"event": "val", "step": state["step"], "epoch": epoch,
                   "val_accuracy": val_accuracy, "val_loss": val_loss})
    if _better(val_accuracy, val_loss, state):
        state["best_val"], state["best_step"] = val_accuracy, state["step"]
        state["best_val_loss"] = val_loss if math.isfinite(val_loss) else None
        save_safetensors(run_dir.weights_path, model.adapter_state_dict(),
                         metadata={"adapter": type(model).__name__})


def _better(val_accuracy: float, val_loss: float, state: dict) -> bool:
    """Higher validation accuracy, or the same with a lower validation loss: a small
    validation split saturates (easy-VQA's 260 questions reach 100% in the first epochs of
    a full-split run), and the first epoch to reach the best accuracy is not the best model
    (a checkpoint from before this rule has no loss: its accuracy alone counts)."""
    best_loss = state.get("best_val_loss")
    return val_accuracy > state["best_val"] or (
        val_accuracy == state["best_val"] and best_loss is not None and val_loss < best_loss)


def _log(run_dir: RunDir, record: dict) -> None:
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
             for k, v in record.items()}
    with open(run_dir.metrics_path, "a") as handle:
        handle.write(json.dumps(clean) + "\n")
