"""Where a compressed model goes, written so that a half-done job never shows.

A repository model folder (one with ``model.yaml``) as destination gets a new version folder,
``<max existing version + 1>/<filename>``: the compressed model then sits next to the original and
the repository's version policy decides what is served. ``model.yaml`` is left alone on purpose:
the default policy (``latest: 1``) serves only the new version; ``version_policy: all`` or
``{latest: 2}`` serves original and compressed side by side (clients pick with ``/versions/N``).

Any other destination is a file path (it has a suffix, e.g. ``out/model.int8.onnx``) or a folder.

Work is done in a hidden temporary folder beside the destination (a name the repository never takes
for a version, since it is not all digits) and renamed into place by ``OutputTarget.commit()`` only
after quantization, measurement and the report succeed; ``abort()`` removes it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import CompressError


def repository_versions(model_dir: Path) -> list[int]:
    """Version folders of a repository model, sorted (the repository's own rule: positive integers)."""
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isascii() and p.name.isdigit() and int(p.name) > 0)


def is_repository_model(path: Path) -> bool:
    return path.is_dir() and (path / "model.yaml").is_file()


@dataclass
class OutputTarget:
    """The final file (``path``), the folder it is written in meanwhile (``work_dir``), and, for a
    repository model, the new version number."""

    path: Path                 # where the model file will be once committed
    work_dir: Path             # temporary folder holding the model file and its report until commit
    version: int | None = None  # the new version folder's number when dst is a repository model
    committed: bool = False

    @property
    def work_path(self) -> Path:
        return self.work_dir / self.path.name

    @property
    def report_path(self) -> Path:
        """``report.json`` next to the model file (in its version folder for a repository model)."""
        return self.path.parent / "report.json"

    @property
    def work_report_path(self) -> Path:
        return self.work_dir / "report.json"

    def commit(self) -> Path:
        """Move the finished files into place. A version folder appears whole (one rename)."""
        if self.version is not None:
            if self.path.parent.exists():  # another job took this version meanwhile
                raise CompressError(f"{self.path.parent} appeared while compressing (another job?); nothing written")
            os.rename(self.work_dir, self.path.parent)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for f in sorted(self.work_dir.iterdir()):
                os.replace(f, self.path.parent / f.name)
            self.work_dir.rmdir()
        self.committed = True
        return self.path

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def resolve_output(dst: Path, filename: str, create: bool = True) -> OutputTarget:
    """Decide where ``filename`` goes for destination ``dst`` (see the module docstring).

    With ``create=False`` nothing is made on disk (validation only); ``work_dir`` is then only a
    name. Raises CompressError when ``dst`` is unusable (an existing file in the way of a folder).
    """
    dst = Path(dst)
    if is_repository_model(dst):
        version = (repository_versions(dst) or [0])[-1] + 1
        path = dst / str(version) / filename
        parent = dst
    elif dst.is_dir() or not dst.suffix:
        if dst.exists() and not dst.is_dir():
            raise CompressError(f"--out {dst}: exists and is not a folder")
        path, version, parent = dst / filename, None, dst
    else:
        if dst.parent.exists() and not dst.parent.is_dir():
            raise CompressError(f"--out {dst}: {dst.parent} is not a folder")
        path, version, parent = dst, None, dst.parent
    if not create:
        return OutputTarget(path=path, work_dir=parent / ".compress.tmp", version=version)
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".compress-", dir=parent))
    return OutputTarget(path=path, work_dir=work, version=version)


def resolve_source(src: Path, filename: str = "model.onnx") -> Path:
    """The model file for ``src``: the file itself, or a repository model's latest version's file."""
    src = Path(src)
    if is_repository_model(src):
        versions = repository_versions(src)
        if not versions or not (src / str(versions[-1]) / filename).is_file():
            raise CompressError(f"{src}: repository model without {filename} in its latest version folder")
        return src / str(versions[-1]) / filename
    if not src.is_file():
        raise CompressError(f"source model {src} does not exist")
    return src
