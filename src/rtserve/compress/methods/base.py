"""The compression-method contract: what ``rtserve compress`` needs from a way of compressing.

``cmd_compress`` (``cli.py``) reads: ``select_method`` (the one flag given, its value, the source's
kind) -> ``method.prepare(args)`` (every check, nothing written) -> ``method.run(job)`` (the work, the
measurements, the result and its ``report.json`` moved into place) -> print the outcome's summary.
A method is a ``CompressionMethod`` subclass under ``@register_method`` in one module of this
package, and one import line in ``__init__.py``. Registration order is the order of the flags and
``--quantize`` values in ``--help``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .. import CompressError
from ..output import OutputTarget
from ..report import CompressionReport, format_report


def source_kind(src: Path) -> str:
    """``hf-decoder`` (a folder with a Hugging Face ``config.json``), ``spec`` (a PyTorch spec model
    folder, ``model.spec.json``) or ``onnx`` (anything else: an ``.onnx`` file, a repository model)."""
    if (src / "config.json").is_file():
        return "hf-decoder"
    if (src / "model.spec.json").is_file():
        return "spec"
    return "onnx"


@dataclass(frozen=True)
class CompressionOutcome:
    """What a finished method hands back to the command."""

    report: CompressionReport | dict    # what was written as report.json (a dict for language models)
    path: Path                          # where the result now is
    summary: str                        # the lines the command prints


class CompressionMethod:
    """One way to compress a model.

    Class attributes:
        name: the registry key (``onnx-int8``, ``spec-prune``, ...).
        flag: the option that asks for it, as its argparse dest: ``quantize`` | ``prune`` | ``distill``.
        names: the ``--quantize`` values it implements; empty: the flag takes no method name.
        sources: the source kinds (``source_kind``) it takes; empty: any (``prepare`` refuses the rest).
    """

    name: ClassVar[str]
    flag: ClassVar[str]
    names: ClassVar[tuple[str, ...]] = ()
    sources: ClassVar[tuple[str, ...]] = ()

    def matches(self, args: argparse.Namespace, kind: str) -> bool:
        """Whether this method handles the request (its flag is the one given)."""
        return ((not self.names or getattr(args, self.flag) in self.names)
                and (not self.sources or kind in self.sources))

    def prepare(self, args: argparse.Namespace) -> Any:
        """Check the request and decide every setting; writes nothing.

        Returns:
            The job ``run`` takes (a frozen dataclass).
        Raises:
            CompressError: naming the offending flag, file or value.
        """
        raise NotImplementedError

    def run(self, job: Any) -> CompressionOutcome:
        """Compress, measure source and result, and move the result with its report into place
        whole; on failure nothing is left behind.

        Raises:
            CompressError: bad input only found while working (e.g. a checkpoint the quantizer refuses).
        """
        raise NotImplementedError


COMPRESSION_METHODS: dict[str, CompressionMethod] = {}


def register_method(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: add one instance of ``cls`` to ``COMPRESSION_METHODS`` under ``cls.name``."""
    if cls.name in COMPRESSION_METHODS:
        raise ValueError(f"compression method '{cls.name}' is registered twice")
    COMPRESSION_METHODS[cls.name] = cls()
    return cls


def flags() -> tuple[str, ...]:
    """The options that ask for a method (argparse dests), in registration order."""
    return tuple(dict.fromkeys(m.flag for m in COMPRESSION_METHODS.values()))


def method_names(flag: str) -> tuple[str, ...]:
    """Every value of ``--<flag>`` some method implements."""
    return tuple(n for m in COMPRESSION_METHODS.values() if m.flag == flag for n in m.names)


def _given(args: argparse.Namespace, flag: str) -> bool:
    value = getattr(args, flag, None)
    return value is not None and value is not False and value != ""


def select_method(args: argparse.Namespace) -> CompressionMethod:
    """The method for the request: exactly one flag must be given; the first registered method
    whose ``matches`` holds, else the first registered for that flag (whose ``prepare`` then says
    what it cannot take, e.g. an unknown ``--quantize`` value).

    Raises:
        CompressError: no flag, or more than one.
    """
    given = [f for f in flags() if _given(args, f)]
    if len(given) != 1:
        raise CompressError(f"give exactly one of {', '.join('--' + f for f in flags())}"
                            + (f" (got {', '.join('--' + f for f in given)}; chain them through repository "
                               "versions)" if given else ""))
    candidates = [m for m in COMPRESSION_METHODS.values() if m.flag == given[0]]
    kind = source_kind(Path(args.src))
    return next((m for m in candidates if m.matches(args, kind)), candidates[0])


def file_outcome(report: CompressionReport, target: OutputTarget) -> CompressionOutcome:
    """The outcome of a method that wrote one model file (and ``report.json``) through ``OutputTarget``."""
    where = f"version {target.version} of {target.path.parent.parent}" if target.version else str(target.path)
    return CompressionOutcome(report, target.path,
                              f"{format_report(report)}\nwrote {where} and {target.report_path}")
