"""AOTInductor: the run's compiled `model.pt2` package, loaded with torch alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError, BackendUnavailableError
from ..interface import OUTPUT_NAMES
from .base import Predictor

PACKAGE_FILE = "model.pt2"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # a package's precision -> dtype


def device_problem(device: str) -> str | None:
    """Why a package compiled for `device` cannot run here, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "model.pt2 is compiled for CUDA and this machine has no CUDA device"
    return None


class AotiPackage:
    """A loaded `.pt2` package: its inputs (numpy: pixel_values, or a shared trunk's
    features, FP32; a vqa engine's token ids and mask too, int64) in, outputs by name
    (`output_names`, in the package's order)."""

    def __init__(self, path: Path, device: str, precision: str,
                 output_names: tuple[str, ...] = OUTPUT_NAMES):
        if problem := device_problem(device):
            raise BackendUnavailableError("aoti", problem)
        self.device, self.precision, self.dtype = device, precision, DTYPES[precision]
        self.output_names = output_names
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # the loader raises untyped errors for a bad package
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ArtifactError(f"{path}: AOTInductor cannot load it ({first_line})") from None

    @torch.inference_mode()
    def __call__(self, *inputs: np.ndarray) -> dict[str, np.ndarray]:
        tensors = [torch.from_numpy(x).to(device=self.device, dtype=self.dtype)
                   if np.issubdtype(x.dtype, np.floating)
                   else torch.from_numpy(x).to(self.device) for x in inputs]
        outputs = self.runner(*tensors)
        if isinstance(outputs, torch.Tensor):  # a one-output graph (a shared trunk)
            outputs = (outputs,)
        return {name: tensor.float().cpu().numpy()
                for name, tensor in zip(self.output_names, outputs, strict=True)}


class AotiPredictor(Predictor):
    """The run's `model.pt2` (record "aoti"), on the device it was compiled for."""

    backend = "aoti"

    def __init__(self, run_path: str | Path):
        super().__init__(run_path, "aoti")
        self.device, self.precision = self.record.device, self.record.precision
        self.package = AotiPackage(self.run_dir.export_dir / self.record.main_file,
                                   self.device, self.precision)

    def describe(self) -> str:
        return f"aoti ({self.device}, {self.precision})"

    def run_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return self.package(pixel_values)

    def run_questions(self, pixel_values: np.ndarray, input_ids: np.ndarray,
                      attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        return self.package(pixel_values, input_ids, attention_mask)
