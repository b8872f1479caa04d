"""Splitting a model by structure: ``planner.py`` cuts a layer chain into balanced stages,
``backends/pipeline.py`` serves the stages as one model, micro-batches flowing through them."""
