"""The sidecar and gateway data plane and its agent."""
