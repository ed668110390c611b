"""Benchmarks of EESD against HF `generate`, HF early-exit assisted generation and our own paths (DESIGN §7)."""
