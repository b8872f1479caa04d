"""rtserve: real-time inference serving."""
__version__ = "0.1.0"
