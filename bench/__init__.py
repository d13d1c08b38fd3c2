"""Benchmarks: same-process, side-by-side comparisons of darwinlm against reference-faithful baselines.

Why this package exists: speed claims are only meaningful as ratios measured on the same machine, in the
same process, on the same inputs. ``bench.baselines`` holds slow implementations written the way the
reference code works (bench-only, never imported by the library); each ``bench/<topic>.py`` script
times one library component against its baseline and prints a table (or ``--json``). See
``bench/README.md`` for how to run them and the numbers measured.
"""
