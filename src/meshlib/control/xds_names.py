"""Names shared by the xDS resources and the bootstraps that point at them (no protos needed to import this)."""

#: The route configuration Envoy sidecars' outbound listener takes: every service, one virtual host each.
OUTBOUND = "mesh-outbound"
#: The cluster an Envoy bootstrap names for the control plane's ADS port.
XDS_CLUSTER = "meshlib-xds"
#: The route configuration an Envoy sidecar's inbound listener takes for its service ``{}``: one route to the app,
#: with the service's ``authorization`` as that route's RBAC.
INBOUND_ROUTES = "mesh-inbound/{}"
#: The static cluster, in an Envoy sidecar's bootstrap, that reaches the app beside it.
INBOUND_APP = "mesh-inbound-app"
#: The Envoy secrets holding a sidecar's mesh certificate and the mesh roots, and the files (in its identity
#: directory) that Envoy reads them from (SDS from the filesystem: Envoy reloads them when they are replaced).
CERT_SECRET = "mesh-cert"
ROOTS_SECRET = "mesh-roots"
SDS_FILES = {CERT_SECRET: "cert-sds.json", ROOTS_SECRET: "roots-sds.json"}
#: Node metadata: the node holds a mesh identity ("on"); an Envoy node's identity directory.
TLS_META = "mesh.tls"
IDENTITY_DIR_META = "mesh.identity_dir"
