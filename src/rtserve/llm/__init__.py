"""The generative path: continuous batching over a paged KV cache, native Hugging Face decoders.

``sequence``, ``block_manager`` and ``scheduler`` are plain Python with no torch import, so they
are unit-tested in milliseconds with fake model outputs.
"""
