"""Names shared by the xDS resources and the bootstraps that point at them (no protos needed to import this)."""

#: The route configuration Envoy sidecars' outbound listener takes: every service, one virtual host each.
OUTBOUND = "mesh-outbound"
#: The cluster an Envoy bootstrap names for the control plane's ADS port.
XDS_CLUSTER = "meshlib-xds"
