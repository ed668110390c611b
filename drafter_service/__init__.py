"""The drafter service: first N layers + exit layer behind gRPC, streaming drafts to verifiers.

Its part in a round: docs/architecture.md §5.
"""
