"""Splitting a model by structure into balanced stages that ``backends/pipeline.py`` serves as one
model, micro-batches flowing through them.

- ``planner.py``: a layer chain (a PyTorch spec model, ``nn.Sequential``) cut between layers, one
  tensor per cut (the DP partition, shared with ``graph.py``), and its stages written;
- ``graph.py``: a ``torch.export`` program's graph cut between operations, any tensors per cut
  (analysis, valid cuts, the plan, each stage's graph);
- ``graph_costs.py``: the cost of each graph operation (FLOPs from the real shapes, or timed);
- ``graph_export.py``: the planned graph stages re-exported and written as a pipeline model;
- ``cli.py``: ``rtserve split``, which picks the chain or the graph splitter by the source.
"""
