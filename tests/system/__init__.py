"""Tests of the whole system: processes, a cluster, the docs, the benchmarks, lint, layout."""
