from .batcher import DynamicBatcher
from .request import InferRequest, RequestState

__all__ = ["DynamicBatcher", "InferRequest", "RequestState"]
