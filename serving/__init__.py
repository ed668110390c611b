"""gRPC plumbing shared by the drafter, verifier and controller services (no model code here)."""
