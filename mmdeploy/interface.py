"""The deployed model's interface, the same for every backend: one input, `pixel_values`
[batch, 3, H, W] float32 (what the preprocessor makes; transformers' name for it), and two
outputs, `logits` [batch, classes] and `embeddings` [batch, dim].

A vqa run's engine takes the question too, as its tokenizer makes it (`mmdeploy.questions`):
`input_ids` and `attention_mask`, int64 [batch, tokens], the token axis dynamic up to the
tokenizer's limit; the text tower runs inside the engine. Its outputs are the same two, over
the run's answers."""

INPUT_NAME = "pixel_values"
QUESTION_INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits", "embeddings")
