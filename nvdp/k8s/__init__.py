"""The little of the Kubernetes API that nvdp uses: read its own Node's labels and, optionally, one ConfigMap.

`client` builds an HTTP client from the in-cluster service account or a kubeconfig; `watch` is a generic
list-then-watch of one object; `node_labels` and `configmap` are the two watches nvdp needs. Everything runs on trio
through httpx; nothing here reads `os.environ` (the CLI passes the environment in).
"""
