"""``python -m rtserve.llm.native``: build the kernels ahead of use (``make install`` does)."""
import sys

import torch

from . import library_path, ops, unavailable_reason

if ops() is None:
    print(f"rtserve native kernels: not built ({unavailable_reason()})", file=sys.stderr)
    sys.exit(1)
print(f"rtserve native kernels: {library_path()} ({torch.ops.rtserve.isa()})")
