"""Benchmarks of EESD against HF `generate`, HF early-exit assisted generation and our own paths.

What they measure is modelled in docs/architecture.md §9.
"""
