"""Frozen image and text towers from `transformers`.

A backbone is either one checkpoint directory holding both towers (a `CLIPModel`-style
config with `vision_config` and `text_config`), or two directories (`VISION_DIR,TEXT_DIR`,
e.g. a ViT/DINOv2 image tower and a BERT text tower, as GA-Net's released code uses), or
`tiny`: a seeded tiny CLIP built from a config, with its own tokenizer and image processor,
saved with `save_pretrained` and loaded back through the same path as a real checkpoint.

Nothing is downloaded: every path is local and weights are read from safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import BackboneConfig
from .errors import BackboneMismatchError, ConfigError
from .hub import is_hub_id, resolve
from .images import Preprocessor

TINY_IMAGE_SIZE = 32
TINY_MAX_TEXT_LENGTH = 32
_TINY_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
_TINY_CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-!?")
# Keys that change with the library version or the load path, not with the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype",
                         "torch_dtype", "_attn_implementation_autoset", "output_hidden_states"}


def torch_device() -> str:
    """Where torch models run on this machine: "cuda" when torch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMDEPLOY_CACHE", Path.home() / ".cache" / "mm-peft-deploy"))


class Backbone(nn.Module):
    """Both frozen towers, their tokenizer and the image preprocessing.

    `image_features` and `encode_text` return pooled features in the towers' shared
    space when the checkpoint has projections (CLIP); otherwise the raw pooled width of
    each tower (the adapter then learns a projection between them): the CLS token, or the
    token mean for a sentence-transformers text tower that pools so (`sentence_pooling`).
    """

    def __init__(self, vision: nn.Module, text: nn.Module, tokenizer, preprocessor: Preprocessor,
                 config: BackboneConfig, identity: dict, visual_projection: nn.Module | None = None,
                 text_projection: nn.Module | None = None, logit_scale: float | None = None):
        super().__init__()
        self.vision = vision
        self.text = text
        self.visual_projection = visual_projection
        self.text_projection = text_projection
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.config = config
        self.identity = identity
        self.logit_scale_init = logit_scale if logit_scale is not None else float(torch.log(
            torch.tensor(1 / 0.07)))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Frozen towers stay in eval mode whatever the enclosing model does."""
        return super().train(False)

    @property
    def vision_width(self) -> int:
        return self.vision.config.hidden_size

    @property
    def text_width(self) -> int:
        return self.text.config.hidden_size

    @property
    def image_embed_dim(self) -> int:
        proj = self.visual_projection
        return proj.out_features if proj is not None else self.vision_width

    @property
    def text_embed_dim(self) -> int:
        proj = self.text_projection
        return proj.out_features if proj is not None else self.text_width

    @property
    def shared_space(self) -> bool:
        """Whether image and text features live in one embedding space: a CLIP-style
        checkpoint whose projections map both towers into it. Equal widths alone say
        nothing (DINOv2-S and MiniLM are both 384 wide and were never aligned)."""
        return (self.visual_projection is not None and self.text_projection is not None
                and self.image_embed_dim == self.text_embed_dim)

    def vision_blocks(self) -> nn.ModuleList:
        """The image tower's transformer blocks, found by structure, not attribute path."""
        return _transformer_blocks(self.vision)

    def text_blocks(self) -> nn.ModuleList:
        return _transformer_blocks(self.text)

    def pool_image(self, outputs) -> torch.Tensor:
        """CLS feature: CLIP's pooler is the post-LayerNorm CLS; others' last state is normed."""
        if self.visual_projection is not None:
            return self.visual_projection(outputs.pooler_output)
        return outputs.last_hidden_state[:, 0]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool_image(self.vision(pixel_values=pixel_values))

    def vision_tokens(self, pixel_values: torch.Tensor, block: int) -> torch.Tensor:
        """The tokens entering image block `block` [B, T, W]; the blocks from there on are
        not run. With `image_features_from`, the tower split in two at `block`."""
        captured = []

        def stop(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        handle = self.vision_blocks()[block].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.vision(pixel_values=pixel_values)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    def image_features_from(self, tokens: torch.Tensor, block: int) -> torch.Tensor:
        """`image_features` continued from `vision_tokens(pixels, block)`: the remaining
        blocks, then what `pool_image` takes of their output. A per-token norm commutes with
        taking the CLS token, so only the CLS is normed: CLIP's `post_layernorm` (what its
        pooler output is) when there is a projection; else the norm DINOv2 and ViT apply to
        their last hidden state (`layernorm`), none for CLIP's towers. The trainer checks
        the result against the whole forward (`trainers.frozen_cache`)."""
        hidden = tokens
        for layer in self.vision_blocks()[block:]:
            hidden = layer(hidden, None)
        cls = hidden[:, 0]
        if self.visual_projection is not None:
            return self.visual_projection(self.vision.post_layernorm(cls))
        last_state_norm = getattr(self.vision, "layernorm", None)
        return last_state_norm(cls) if last_state_norm is not None else cls

    @property
    def max_text_length(self) -> int:
        """The most tokens a text keeps: the tokenizer's limit, or the text tower's position
        table where the tokenizer sets none (or a larger one)."""
        positions = getattr(self.text.config, "max_position_embeddings", None)
        return min(self.tokenizer.model_max_length, positions or self.tokenizer.model_max_length)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, on the text tower's device; each text cut at
        `max_text_length` tokens (serving cuts alike: `mmdeploy.questions`)."""
        device = next(self.text.parameters()).device
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                max_length=self.max_text_length, return_token_type_ids=False)
        return {name: tensor.to(device) for name, tensor in tokens.items()}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        """Pooled text features and all hidden states ([embeddings, block 1, ..., block N])."""
        out = self.text(**tokens, output_hidden_states=True)
        if self.text_projection is not None:
            pooled = self.text_projection(out.pooler_output)
        elif self.identity.get("text_pooling") == "mean":
            mask = tokens["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = out.last_hidden_state[:, 0]
        return pooled, out.hidden_states

    def assert_frozen(self) -> None:
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        if trainable:
            raise AssertionError(f"backbone parameters became trainable: {trainable[:3]}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _StopForward(Exception):
    """Raised by `vision_tokens`' hook to end the image tower's forward early."""


def _transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The longest ModuleList of blocks in a tower (`encoder.layers`, `encoder.layer`, ...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of transformer blocks")
    return max(lists, key=len)


def load_backbone(config: BackboneConfig, expected_identity: dict | None = None) -> Backbone:
    """Load (building `tiny` on first use) and check it is the backbone a run was made on."""
    if config.spec == "tiny":
        directory = default_cache_dir() if config.cache_dir is None else Path(config.cache_dir)
        path = directory / f"tiny-clip-seed{config.tiny_seed}"
        if not (path / "config.json").exists():
            build_tiny_clip(path, seed=config.tiny_seed)
        backbone = _load_dirs(config, path, None)
    else:
        folders, revisions = _checkpoint_dirs(config.spec)
        backbone = _load_dirs(config, *folders) if len(folders) == 2 else \
            _load_dirs(config, folders[0], None)
        if revisions:  # what a hub id resolved to is part of what the run was trained on
            backbone.identity = {**backbone.identity, "revisions": revisions}
    if expected_identity is not None and backbone.identity != expected_identity:
        raise BackboneMismatchError(
            f"this adapter was trained on backbone {identity_summary(expected_identity)} but "
            f"{config.spec!r} is {identity_summary(backbone.identity)}")
    return backbone


def _checkpoint_dirs(spec: str) -> tuple[list[Path], dict[str, str]]:
    """The local folders of `DIR`, `VISION,TEXT` or hub ids (`org/name[@revision]`, each
    resolved into the Hugging Face cache: `hub.resolve`), and the commit each hub id
    resolved to."""
    parts = [part.strip() for part in spec.split(",")]
    if len(parts) > 2:
        raise ConfigError(f"{spec}: a backbone is one checkpoint or VISION,TEXT")
    folders, revisions = [], {}
    for part in parts:
        if is_hub_id(part):
            folder, commit = resolve(part)
            revisions[part.partition("@")[0]] = commit
            folders.append(folder)
        else:
            folders.append(Path(part))
    return folders, revisions


def identity_summary(identity: dict) -> str:
    """A backbone identity in one short phrase, for messages that name two of them."""
    return f"config {identity['config_sha256'][:12]}, weights {identity['weights_sha256'][:12]}"


def _load_dirs(config: BackboneConfig, first: Path, text_dir: Path | None) -> Backbone:
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    for path in (first, text_dir):
        if path is not None and not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a transformers checkpoint directory (no config.json)")
    model = AutoModel.from_pretrained(first, use_safetensors=True)
    if text_dir is None:
        model_config = AutoConfig.from_pretrained(first)
        if not hasattr(model_config, "vision_config") or not hasattr(model_config, "text_config"):
            raise ConfigError(f"{first}: one directory must hold both towers (a CLIP-style "
                              "checkpoint); pass VISION_DIR,TEXT_DIR for separate towers")
        vision, text = model.vision_model, model.text_model
        scale = getattr(model, "logit_scale", None)
        backbone = Backbone(
            vision, text, AutoTokenizer.from_pretrained(first), Preprocessor.from_pretrained(first),
            config, identify(first), getattr(model, "visual_projection", None),
            getattr(model, "text_projection", None),
            float(scale.detach()) if scale is not None else None)
    else:
        text = AutoModel.from_pretrained(text_dir, use_safetensors=True)
        identity = identify(first, text_dir)
        if sentence_pooling(text_dir) == "mean":  # a key only then: other identities unchanged
            identity["text_pooling"] = "mean"
        backbone = Backbone(model, text, AutoTokenizer.from_pretrained(text_dir),
                            Preprocessor.from_pretrained(first), config, identity)
    backbone.assert_frozen()
    return backbone


def sentence_pooling(directory: Path) -> str:
    """How a sentence-transformers checkpoint pools its tokens ("mean" or "cls", from its
    Pooling module's config), so that its text features are the embeddings it was trained
    to give; "cls" for any other checkpoint."""
    try:
        modules = json.loads((directory / "modules.json").read_text())
        path = next(m["path"] for m in modules if m.get("type", "").endswith("models.Pooling"))
        config = json.loads((directory / path / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return "cls"
    return "mean" if config.get("pooling_mode_mean_tokens") else "cls"


def identify(*directories: Path) -> dict:
    """Backbone identity: a hash of the model configs and one of the weight files."""
    config_hash, weights_hash = hashlib.sha256(), hashlib.sha256()
    for directory in directories:
        config = json.loads((directory / "config.json").read_text())
        config_hash.update(json.dumps(_stable(config), sort_keys=True).encode())
        weight_files = sorted(directory.glob("*.safetensors"))
        if not weight_files:
            raise ConfigError(f"{directory}: no *.safetensors weights (pickled weights are "
                              "refused; convert them with safetensors first)")
        for weights in weight_files:
            with open(weights, "rb") as handle:
                for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                    weights_hash.update(chunk)
    return {"config_sha256": config_hash.hexdigest(), "weights_sha256": weights_hash.hexdigest()}


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    return value


def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """Write a seeded tiny CLIP checkpoint with its tokenizer and image processor.

    The tokenizer is a character-level WordPiece built with `tokenizers` (any lower-case
    prompt tokenizes without a trained vocabulary); the processor is CLIP's, at 32 px.
    Written to a temporary directory and renamed, so a crash leaves no half checkpoint.
    """
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    tokenizer = _tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=len(vocab),
                         max_position_embeddings=TINY_MAX_TEXT_LENGTH,
                         pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[CLS]"],
                         eos_token_id=vocab["[SEP]"]),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=8),
        projection_dim=64)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    staging = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    _tiny_image_processor().save_pretrained(staging)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, path)
    except OSError:  # another process built it first; theirs is identical (same seed)
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return path


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = _TINY_SPECIALS + _TINY_CHARACTERS + [f"##{c}" for c in _TINY_CHARACTERS]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                 ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", model_max_length=TINY_MAX_TEXT_LENGTH)


def _tiny_image_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE},
                              crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
