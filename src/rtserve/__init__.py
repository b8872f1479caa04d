"""rtserve: real-time inference serving."""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import rtserve` stays cheap and pulls in no runtime.
    if name == "Model":
        from .models.inprocess import Model

        return Model
    raise AttributeError(name)
