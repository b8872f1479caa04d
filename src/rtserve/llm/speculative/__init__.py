"""Speculative decoding: cheap proposals for a sequence's next K tokens, verified by the target model
in the step's one forward (K + 1 query rows per sequence, batched with the other sequences), accepted
by rejection sampling, so the output is distributed as plain decoding's (greedy: identical tokens).

- ``config.py``: model.yaml's ``engine.speculative`` (no torch).
- ``ngram.py``: prompt lookup; ``draft.py``: a smaller checkpoint of the same vocabulary.
- ``verify.py``: greedy and rejection-sampling acceptance over the target's rows.
- ``speculator.py``: the engine's hooks: extend a scheduled step with proposals, verify, roll back.
"""
