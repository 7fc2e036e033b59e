"""The two errors of MPS set-up, apart from the code that raises them: the daemon and the controller catch them on
every start, and importing them must not load the MPS machinery on a node that shares no GPU through MPS."""


class MpsError(Exception):
    """An MPS daemon cannot be set up at all (no control program, no pipe directory)."""


class ShmError(Exception):
    """The shm tmpfs is missing and nvdp cannot mount it."""
