"""Load generation and reporting for ``rtserve bench`` and benchmarks/."""
from .loadgen import LoadResult, RequestSpec, run_load, run_load_sync
from .report import format_table, percentile, write_json

__all__ = ["LoadResult", "RequestSpec", "format_table", "percentile", "run_load", "run_load_sync", "write_json"]
