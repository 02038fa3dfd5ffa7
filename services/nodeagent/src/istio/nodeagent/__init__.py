"""node-agent: gets a machine's workload certificate from istio-ca and keeps it fresh.

It makes the key (which never leaves the machine) and a CSR for its SPIFFE id, gets the
certificate (the first time with a one-time join token, after that with its current
certificate), and writes cert-chain.pem, key.pem and root-cert.pem where the proxy reads them.
"""
