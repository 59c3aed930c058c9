"""The control plane (``meshctl serve``): versioned rules, an embedded registry and the CA. Never on the data path."""
