"""Platforms the mesh runs on (DESIGN.md §5). `istio.platform.local` is the embedded default:
Pilot, the gateways and every Bookinfo workload with its sidecar as processes on this machine,
each workload on its own loopback address."""
