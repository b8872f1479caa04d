"""The conversion-target contract: what ``rtserve convert --to NAME`` needs from a format.

``convert()`` (``export/convert.py``) reads: check the options -> load the source (``sources.py``:
names, sample inputs and the source's own outputs on them) -> ``target.write`` -> ``target.run`` on
the same samples -> compare -> move into place. A target is one module in this package with a
``ConversionTarget`` subclass under ``@register_target``, and one import line in ``__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

TORCH_SOURCES = ("hf-encoder", "spec", "pt2")  # source kinds that load as a torch program


class ConversionError(ValueError):
    """Bad input, or a converted model that does not compute what its source does."""


@dataclass(frozen=True)
class ConversionOptions:
    """The command's flags, one field each (``rtserve convert --optimize --fp16 --atol --via --batch``)."""

    optimize: bool = False      # ONNX Runtime's offline graph optimization
    fp16: bool = False          # float16 weights (ONNX)
    atol: float | None = None   # verification tolerance; None: ``tolerance``
    via: str = "rtserve"        # the writer, for targets that have several (``ConversionTarget.vias``)
    batch: int = 1              # the batch fixed in the file, for writers that fix it

    @property
    def tolerance(self) -> float:
        return self.atol if self.atol is not None else (2e-2 if self.fp16 else 1e-4)


@dataclass(frozen=True)
class LoadedSource:
    """A source model, loaded and run once: everything a target needs to write and to be verified."""

    path: Path                              # the source file or folder
    kind: str                               # hf-encoder | spec | pt2 | onnx
    input_names: list[str]
    output_names: list[str]
    samples: list[dict[str, np.ndarray]]    # input sets (name -> array), batch axis first
    reference: list[list[np.ndarray]]       # the source's outputs on each input set
    module: Any = None                      # the torch callable exporters trace (None for an ONNX source)
    example: tuple = ()                     # its example inputs, positional, in ``input_names`` order
    dynamic_shapes: Any = None              # ``torch.export`` dynamic shapes of ``example``


class ConversionTarget:
    """A format ``rtserve convert`` writes.

    Class attributes:
        name: the ``--to`` value, and the file suffix of ``model.<name>``.
        sources: the source kinds it converts from; any other is refused with ``sources_error``.
        vias: the ``--via`` writers it has (the first is the default, ``rtserve``).
        takes_onnx_options: whether ``--optimize`` and ``--fp16`` apply to it.

    Subclasses implement ``write`` and ``run``; ``check`` and ``fixed_batch`` have defaults.
    """

    name: ClassVar[str]
    sources: ClassVar[tuple[str, ...]] = TORCH_SOURCES
    sources_error: ClassVar[str] = "an ONNX source converts only to optimized ONNX (--to onnx --optimize)"
    vias: ClassVar[tuple[str, ...]] = ("rtserve",)
    takes_onnx_options: ClassVar[bool] = False

    def check(self, kind: str, options: ConversionOptions) -> None:
        """Refuse, before any work, a source kind or an option this target does not take.

        Raises:
            ConversionError: naming the flag or the source kind.
        """
        if kind not in self.sources:
            raise ConversionError(self.sources_error)
        if not self.takes_onnx_options:
            for flag, on in (("--fp16", options.fp16), ("--optimize", options.optimize)):
                if on:
                    raise ConversionError(f"{flag} applies to ONNX output only")

    def fixed_batch(self, options: ConversionOptions) -> int | None:
        """The batch size the written file is fixed to (samples then all use it); None: dynamic."""
        return None

    def write(self, source: LoadedSource, path: Path, options: ConversionOptions) -> None:
        """Write ``source`` in this format at ``path`` (a file in a temporary folder).

        Raises:
            ConversionError: the source uses something this writer cannot express.
        """
        raise NotImplementedError

    def run(self, path: Path, samples: list[dict[str, np.ndarray]], names: list[str]) -> list[list[np.ndarray]]:
        """Run the written file on every input set (``names``: the source's input order); returns
        each set's outputs in the source's output order, for ``compare``."""
        raise NotImplementedError


TARGETS: dict[str, ConversionTarget] = {}


def register_target(cls: type[ConversionTarget]) -> type[ConversionTarget]:
    """Class decorator: add one instance of ``cls`` to ``TARGETS`` under ``cls.name``."""
    if cls.name in TARGETS:
        raise ValueError(f"conversion target '{cls.name}' is registered twice")
    TARGETS[cls.name] = cls()
    return cls


def vias() -> tuple[str, ...]:
    """Every ``--via`` writer of every target, in registration order."""
    return tuple(dict.fromkeys(v for t in TARGETS.values() for v in t.vias))


def target_for(name: str, options: ConversionOptions) -> ConversionTarget:
    """The registered target ``name``, once the target-independent options are checked.

    Raises:
        ConversionError: an unknown ``--to`` or ``--via``, a ``--via`` the target lacks, ``--batch`` < 1.
    """
    if name not in TARGETS:
        raise ConversionError(f"--to '{name}' is not one of {', '.join(TARGETS)}")
    if options.via not in vias():
        raise ConversionError(f"--via '{options.via}' is not one of {', '.join(vias())}")
    target = TARGETS[name]
    if options.via not in target.vias:
        having = ", ".join(t.name for t in TARGETS.values() if options.via in t.vias)
        raise ConversionError(f"--via {options.via} applies to --to {having} only")
    if options.batch < 1:
        raise ConversionError("--batch must be >= 1")
    return target
