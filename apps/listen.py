"""Opening the port a server listens on, so that a busy port or a bad host is one clear
error line before anything heavy (a model, Ray) starts."""

from __future__ import annotations

import os
import socket

from ..errors import ConfigError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port` (port 0: one the OS picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port} ({reason})") from None
