"""EESD core: early-exit drafter, full-model verifier, lossless acceptance, draft policies, engine."""
