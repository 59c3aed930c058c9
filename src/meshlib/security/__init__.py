"""Zero trust: service identities (SPIFFE X.509), the CA that issues them, TLS contexts and authorization."""
