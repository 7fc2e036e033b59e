"""nvdp: the NVIDIA device plugin for Kubernetes, on trio."""

__version__ = "0.1.0"
