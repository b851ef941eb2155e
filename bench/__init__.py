"""Benchmarks of medbatch against plain single-process scripts (`python -m bench`, `make bench`).

Not part of the test suite: each section starts the real service as a subprocess over a temp
folder tree, measures it, cleans up, and returns a `SectionResult` for the summary table.
"""
