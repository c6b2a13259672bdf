"""The `Predictor` base cuts a batch into chunks of at most the export's largest batch (a
last chunk below its smallest is padded), so callers (the app, Ray Serve, batch inference)
never chunk themselves."""

from __future__ import annotations

import numpy as np
import pytest

from mmdeploy.errors import InputError
from mmdeploy.runtime.base import Predictor


class Recording(Predictor):
    """A predictor whose 'model' returns each image's mean pixel as its logits and records
    the batch sizes it was called with."""

    backend = "recording"

    def __init__(self, batch_range: tuple[int, int | None]):  # no run: the base is under test
        self.batch_range = batch_range
        self.calls: list[int] = []
        self.preprocessor = type("P", (), {"image_size": (4, 4)})()

    def run_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        low, high = self.batch_range
        assert low <= len(pixel_values) <= (high or len(pixel_values))
        self.calls.append(len(pixel_values))
        means = pixel_values.mean(axis=(1, 2, 3))
        return {"logits": np.stack([means, -means], axis=1)}


@pytest.mark.parametrize(("batch_range", "batch", "calls"), [
    ((1, 8), 20, [8, 8, 4]),
    ((1, 8), 8, [8]),
    ((1, None), 20, [20]),
    ((2, 4), 9, [4, 4, 2]),  # the last image alone is padded up to the smallest batch
])
def test_batches_are_cut_to_the_export_range(batch_range, batch, calls):
    predictor = Recording(batch_range)
    pixels = np.random.default_rng(0).normal(size=(batch, 3, 4, 4)).astype(np.float32)
    probs, labels = predictor.predict_pixels(pixels)
    assert predictor.calls == calls
    means = pixels.mean(axis=(1, 2, 3))
    assert probs.shape == (batch, 2)
    np.testing.assert_array_equal(labels, (means < 0).astype(int))


def test_too_small_a_batch_and_a_wrong_shape_are_refused():
    predictor = Recording((2, 8))
    with pytest.raises(InputError, match=r"batch 1 is outside the export's range 2\.\.8"):
        predictor.predict_pixels(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"expected \[batch, 3, 4, 4\]"):
        predictor.predict_pixels(np.zeros((2, 3, 5, 4), np.float32))
    assert predictor.calls == []
