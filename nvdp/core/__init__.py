"""The pure core: config, the resource plan (allocation, preferred allocation, labels) and the health policy.

Plain functions over plain data. Nothing here does I/O on its own initiative or imports an event loop, an RPC stack,
NVML, an HTTP client or a metrics library; `.importlinter` enforces it, and the shells around it (`nvdp.kubelet`,
`nvdp.nvml`, `nvdp.mps`, `nvdp.k8s`, `nvdp.observe`) translate the outside world into these types.
"""
