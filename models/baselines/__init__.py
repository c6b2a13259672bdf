"""Baselines: zero-shot prompts, a linear probe, LoRA on the image tower."""
