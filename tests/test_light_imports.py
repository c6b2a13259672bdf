"""Listing inputs, decoding and preprocessing images, reading runs and manifests, checking
artifact hashes, choosing a backend and batch inference's own modules import no torch: its
decode workers (Ray's tasks among them) start without paying for it. Only predictors,
models and training import torch."""

from __future__ import annotations

import subprocess
import sys

LIGHT_MODULES = ["mmdeploy.inference.inputs", "mmdeploy.inference.writers",
                 "mmdeploy.inference.batch", "mmdeploy.inference.ray_engine", "mmdeploy.data",
                 "mmdeploy.images", "mmdeploy.artifacts", "mmdeploy.rows", "mmdeploy.runs",
                 "mmdeploy.runtime", "mmdeploy.runtime.base"]


def test_input_decode_and_manifest_modules_import_no_torch():
    code = (f"import sys\nfor name in {LIGHT_MODULES!r}:\n    __import__(name)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_check_sees_torch_when_it_is_imported():
    """The same check on a module that does import torch, so the test above can fail."""
    code = "import sys\nimport mmdeploy.backbone\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "True"
