"""Files named by a model (``labels:`` in model.yaml, a checkpoint's shard list, a pipeline's stage
files) and the files a model kind reads stay inside the folder they belong to.

A path is refused when it is absolute, when it climbs out with ``..``, or, unless symlinks are
allowed, when it resolves (through a symlink anywhere along it) to a place outside the folder. A
symlink whose target stays inside is fine. Operators who keep models elsewhere and link them in opt
in with ``rtserve serve --allow-symlinks`` (``ServerConfig.allow_symlinks``).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError

SYMLINK_HINT = "allow links out of the repository with rtserve serve --allow-symlinks"


def confined(root: Path, relative: str | Path, what: str, allow_symlinks: bool = False) -> Path:
    """``root / relative``, checked to stay inside ``root``.

    Args:
        root: the folder the path must stay in (a model folder, a checkpoint folder, the repository).
        relative: the path as given, relative to ``root``.
        what: names the path in the error (the model.yaml key or the file).
        allow_symlinks: only check the path as written, not where its symlinks lead.
    Returns:
        ``root / relative`` (not resolved: errors and logs show the path as the operator wrote it).
    Raises:
        ConfigError naming ``what``, the path and the reason.
    """
    rel = Path(relative)
    if rel.is_absolute():
        raise ConfigError(f"{what}: '{relative}' is an absolute path; it must be relative to {root}")
    if os.path.normpath(rel).split(os.sep)[0] == "..":
        raise ConfigError(f"{what}: '{relative}' leaves {root} ('..')")
    path = Path(root) / rel
    if allow_symlinks:
        return path
    top, target = Path(root).resolve(), path.resolve()
    if target != top and top not in target.parents:
        raise ConfigError(f"{what}: {path} resolves to {target}, outside {top} (a symlink); {SYMLINK_HINT}")
    return path


def check_inside(root: Path, files: Iterable[Path], allow_symlinks: bool = False) -> None:
    """Every one of ``files`` (paths under ``root``) that exists, or is a dangling link, through
    ``confined``, each named by its path relative to ``root``."""
    for f in files:
        if f.exists() or f.is_symlink():
            rel = f.relative_to(root)
            confined(root, rel, str(rel), allow_symlinks)
