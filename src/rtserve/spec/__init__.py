"""Spec models: a trainable PyTorch network kept as data, not as a pickle (``layers.py``: the JSON
layer list; ``model.py``: ``model.spec.json`` + ``model.safetensors``). ``rtserve convert`` exports
them, ``rtserve compress`` prunes and distils them, ``rtserve split`` cuts them."""
