"""`python -m mmdeploy` is the `mmdeploy` command."""

from .cli import main

main()
