"""The verifier service: the full model behind gRPC (DESIGN §4)."""
