"""mmdeploy: train, export, verify and serve parameter-efficient adapters on frozen
vision-language backbones. Distribution name: ``mm-peft-deploy``."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mm-peft-deploy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
