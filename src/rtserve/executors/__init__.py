"""Where a model instance runs: ``local`` (threads in the server process, the default) or
``process`` (a worker process per instance, tensors through shared memory). See ``process.py``."""

EXECUTORS = ("local", "process")
