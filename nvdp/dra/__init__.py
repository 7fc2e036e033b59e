"""The DRA kubelet plugin: nvdp serving GPUs through `resource.k8s.io/v1` beside the device plugin.

A layer of its own between the test doubles and the shells (`.importlinter`): it composes the kubelet's gRPC
hosting (`nvdp.kubelet.aio`, `grpc_guard`), the Kubernetes API client and the health tracker. `api/` is generated
from proto/ by scripts/gen-proto (the kubelet's DRA, DRA-health and plugin-registration APIs).
"""
