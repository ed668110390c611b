"""The verifier service: the full model behind gRPC (docs/architecture.md §5)."""
