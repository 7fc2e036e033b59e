"""Test doubles: stand-ins for what surrounds nvdp on a node, for `nvdp demo`, the tests and the benchmark.

Nothing that runs on a node imports this package (an import-linter contract in `.importlinter` allows only
`nvdp.demo`), and what it needs beyond nvdp's own dependencies comes with the `emulator` extra (grpcio):
`pip install 'nvdp[emulator]'`.
"""
