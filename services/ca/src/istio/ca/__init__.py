"""istio-ca: the mesh's certificate authority.

A root (generated and kept in a directory or the Kubernetes secret `istio-ca-secret`, or brought
by the user in the `cacerts` layout) signs SPIFFE workload certificates: into the secrets
`istio.<serviceaccount>` on Kubernetes, and over gRPC `IstioCAService/HandleCSR` for node agents.
"""
