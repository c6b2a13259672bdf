"""Image + question -> answer: the vqa forms of the adapters and their fused baselines."""
