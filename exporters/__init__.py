"""Exporters: merge and freeze a run's deploy form, compile it (ONNX, AOTInductor,
TensorRT), check parity against PyTorch, and publish it with its manifest."""
