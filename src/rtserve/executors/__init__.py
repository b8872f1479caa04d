"""Where a model instance runs: ``local`` (threads in the server process, the default),
``process`` (a worker process per instance, tensors through shared memory: ``process.py``) or
``ray`` (a Ray actor per instance, placed by a placement group: ``ray_executor.py``)."""

EXECUTORS = ("local", "process", "ray")
