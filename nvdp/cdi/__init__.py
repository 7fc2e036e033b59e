"""CDI specs on the node: find the driver's files (`discover`), write the spec files (`writer`). The content is
decided in the pure core (`nvdp.core.cdi`); see docs/cdi.md."""


class CdiError(Exception):
    """A CDI spec could not be written or removed; the message names the file and the OS's reason."""
