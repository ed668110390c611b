"""The drafter service: first N layers + exit layer behind gRPC, streaming drafts to verifiers (DESIGN §4)."""
