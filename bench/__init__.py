"""nvdp's benchmark: the daemon as a separate process on a simulated node, measured through the kubelet's interface.

`python -m bench` (full, by hand) or `python -m bench --quick` (seconds, CI). Every figure is measured from a kubelet
emulator speaking gRPC through grpcio in this process, against `python -m nvdp --simulate ...` in a child process;
memory and CPU come from `/proc/<pid>` of that child. docs/performance.md has the latest table and how to read it.
"""
