"""Typed errors: every failure a user can cause is one of these, with a one-line message.

The CLI turns any `MmdeployError` into that line and a non-zero exit; anything else is a
bug and keeps its traceback.
"""


class MmdeployError(Exception):
    """Base of every error the toolkit raises on bad input or a bad artifact."""


class ArtifactError(MmdeployError):
    """A run or export file is missing, truncated, unreadable or fails its sha256 check."""


class BackboneMismatchError(MmdeployError):
    """An adapter is loaded onto a backbone other than the one it was trained on."""


class ParityError(MmdeployError):
    """An exported backend disagrees with the PyTorch model beyond its tolerance."""

    def __init__(self, backend: str, metric: str, value: float, bound: float, detail: str = ""):
        self.backend, self.metric, self.value, self.bound = backend, metric, value, bound
        message = f"{backend} failed parity: {metric} = {value:.3g} (bound {bound:.3g})"
        super().__init__(f"{message}; {detail}" if detail else message)


class EngineIncompatibleError(MmdeployError):
    """A compiled engine was built for another runtime version or device than the one running."""

    def __init__(self, field: str, built: str, runtime: str):
        self.field, self.built, self.runtime = field, built, runtime
        super().__init__(f"engine was built for {field} {built!r} but this machine has {runtime!r}")


class InputError(MmdeployError):
    """An input is not an image, too large, of the wrong shape or outside the export's profile."""


class BackendUnavailableError(MmdeployError):
    """A requested runtime backend cannot run here."""

    def __init__(self, backend: str, reason: str):
        self.backend, self.reason = backend, reason
        super().__init__(f"backend {backend!r} is unavailable: {reason}")


class ConfigError(MmdeployError):
    """A configuration value, adapter name or option combination is invalid."""
