"""Benchmarks of tritonop against what users would pick instead (issue 5).

``python -m bench`` runs the scenarios (:mod:`bench.scenarios`), writes the figures to
``bench/results/`` and regenerates ``docs/benchmarks.md`` (:mod:`bench.report`).
"""
