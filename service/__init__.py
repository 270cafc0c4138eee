"""Liberty Reach Signaling: WebSocket signaling for WebRTC, scaled out through Redis Streams.

``service.app`` is the Sanic application built from the environment, so that
``sanic service.app`` works.  It is built on first access only: importing any other part of
the package (tests, the token tool) needs no configuration.  Prometheus multiprocess mode is
prepared first, before anything imports prometheus_client.
"""

from __future__ import annotations

from typing import Any

from ._promdir import prepare as _prepare_metrics_dir

__version__ = "0.1.0"

_prepare_metrics_dir()


def __getattr__(name: str) -> Any:
    if name == "app":
        import importlib

        _module = importlib.import_module(f"{__name__}.app")

        # Importing the submodule bound `service.app` to the module; rebind it to the app.
        globals()["app"] = _module.app
        return _module.app
    raise AttributeError(name)
