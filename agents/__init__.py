"""OpenExample agents: put an existing model behind an OpenExample controller (data plane)."""
