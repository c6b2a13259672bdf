"""HMMoE: a heterogeneous mixture-of-experts adapter beside the image tower's FFNs."""
