"""OpenExample controller: the OpenExample controller daemon (control plane)."""
