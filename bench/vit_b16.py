"""A ViT-B/16-sized CLIP with random weights, and a bench run on it (`bench --backbone vit-b16`).

Figures at a realistic size without downloads: the image tower has ViT-B/16's shape
(224 px, patch 16, width 768, 12 blocks, 12 heads, MLP 3072) and the text tower CLIP
ViT-B/16's (width 512, 12 blocks, 8 heads, MLP 2048), projected to 512. The weights are
seeded random numbers, so accuracy means nothing here; the cost does: latency depends on
shapes, not on values. The adapter is trained for one step (its weights only need to be
non-zero so that no work is skipped) and exported like any run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from mmdeploy.artifacts import Manifest, RunDir
from mmdeploy.backbone import default_cache_dir, load_backbone
from mmdeploy.config import BackboneConfig, DataConfig, ExportConfig, TrainConfig
from mmdeploy.errors import ConfigError

IMAGE_SIZE = 224
LABEL = "vit-b16"


def build_vit_b16_clip(path: Path, seed: int = 0) -> Path:
    """Write the checkpoint (config, safetensors, tokenizer, image processor) to `path`.

    The tokenizer is the tiny backbone's character-level one (a real BPE vocabulary would
    need a download); the text tower's vocabulary matches it.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = load_backbone(BackboneConfig(spec="tiny")).tokenizer
    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, vocab_size=len(tokenizer),
                         max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=IMAGE_SIZE, patch_size=16),
        projection_dim=512)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                          ).save_pretrained(staging)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, path)
    except OSError:  # built meanwhile by another process; same seed, same files
        shutil.rmtree(staging, ignore_errors=True)
    return path


def checkpoint_dir(seed: int = 0) -> Path:
    """The cached checkpoint, built on first use (about 600 MB)."""
    path = default_cache_dir() / f"vit-b16-clip-random-seed{seed}"
    if not (path / "config.json").exists():
        build_vit_b16_clip(path, seed)
    return path


def prepare_run(out: Path, adapter: str, batches: list[int],
                log: Callable[[str], None] = print) -> Path:
    """A one-step run of `adapter` on the ViT-B/16-sized backbone, exported to ONNX and
    AOTInductor over the bench's batch range, with a dynamic INT8 graph; reused when `out`
    already holds one (an earlier run without the INT8 graph gets it added).

    The INT8 graph is gated as any is, but with open bounds: on random weights the answers
    mean nothing, so the gate's figures are recorded (and shown by the bench, with these
    bounds) while no MatMul moves back to FP32: the INT8 cost is what the bench measures.
    """
    from mmdeploy.exporters.export import export_run
    from mmdeploy.runs import load_run_config
    from mmdeploy.trainers.run import new_run, run_training

    run_dir = RunDir(out)
    spec = str(checkpoint_dir())
    formats: tuple[str, ...] = ("onnx", "aoti")
    if run_dir.config_path.exists():
        run = load_run_config(run_dir)
        if run.backbone.spec != spec or run.adapter != adapter:
            raise ConfigError(f"{out} holds a {run.adapter!r} run on {run.backbone.spec!r}, "
                              f"not {adapter!r} on the ViT-B/16-sized backbone; pick another "
                              "RUN directory")
        if run_dir.manifest_path.exists():
            if Manifest.load(run_dir.manifest_path).record("int8") is not None:
                return out
            formats = ()  # exported before INT8 was: quantize its verified model.onnx
    else:
        log(f"training {adapter} for one step on the ViT-B/16-sized backbone -> {out}")
        prepared = new_run(out, adapter, {}, BackboneConfig(spec=spec),
                           DataConfig(source="demo", shots=1, val_per_class=1,
                                      test_per_class=1),
                           TrainConfig(epochs=1, max_steps=1, batch_size=10))
        run_training(prepared)
    config = ExportConfig(formats=formats, batch_min=min(batches), batch_opt=min(batches),
                          batch_max=max(max(batches), 2), int8="dynamic", gate_agreement=0.0,
                          gate_drop=100.0)
    export_run(out, config, log=log)
    return out
