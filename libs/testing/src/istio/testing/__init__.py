"""Test support shared by every package: real servers started on loopback, and fakes for the
servers that cannot run here (the Kubernetes API server)."""
