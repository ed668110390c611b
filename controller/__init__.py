"""Controller: sessions, the state store, routing/discovery and the round loop."""
