"""DRA (resource.k8s.io/v1) as plain data: the devices nvdp publishes, claims it prepares, its checkpoint."""
