"""The deployed model's interface, the same for every backend: one input, `pixel_values`
[batch, 3, H, W] float32 (what the preprocessor makes; transformers' name for it), and two
outputs, `logits` [batch, classes] and `embeddings` [batch, dim]."""

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "embeddings")
