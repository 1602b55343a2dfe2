"""Helpers shared by the benchmarks; a package, so `make bench` (every bench/*.py) never runs it."""
