"""Load generation and reporting for ``rtserve bench`` and benchmarks/."""
