"""The engine: flows, dispatch, leases and signals, as pure domain logic over a `Store`."""

from ergon_server.engine.config import EngineConfig
from ergon_server.engine.core import Engine

__all__ = ["Engine", "EngineConfig"]
