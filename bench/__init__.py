"""The benchmark stage: `mmdeploy bench` (every backend of a run against PyTorch eager, in
one process: `backends`), this machine's matmul peak and a graph's FLOP count (`peak`), and
the ViT-B/16-sized run it benches on (`vit_b16`). The scripts under `benchmarks/` build on it.
"""
