"""Which NVML health events make a device Unhealthy: the XID policy, from `DP_DISABLE_HEALTHCHECKS` and
`DP_ENABLE_HEALTHCHECKS`.

Pure: the raw environment values come in (only `nvdp/cli.py` reads `os.environ`), a frozen policy comes out.
Semantics follow the upstream device plugin so existing DaemonSet manifests keep meaning the same thing:

- each variable is lower-cased, split on `,`, and each entry trimmed; blank entries are skipped;
- `all` or `xids` means every XID; any other entry must be a positive decimal XID;
- the disabled set is the listed XIDs plus `DEFAULT_IGNORED`;
- an XID listed in ENABLE is critical whatever DISABLE says, and `ENABLE=all` makes every XID critical, the
  default-ignored ones included.

One deliberate difference: upstream stops checking altogether when DISABLE is `all`, even if ENABLE lists XIDs.
Here an explicit ENABLE list still works then ("only these XIDs"), which is the only way to express an allow-list.

Malformed entries are not dropped silently: they land in `XidPolicy.warnings`, for the start-up log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: Each bit as NVML defines it (`nvmlEventType*`); tests check they equal the adapter's constants, which this pure
#: module cannot import without pulling in pynvml.
EVENT_DOUBLE_BIT_ECC = 0x0000000000000002
EVENT_XID_CRITICAL = 0x0000000000000008

#: XIDs that an application usually causes by itself; they say nothing about the GPU, so they never mark it.
DEFAULT_IGNORED: frozenset[int] = frozenset(
    {
        13,  # graphics engine exception: typically an out-of-bounds access in a kernel
        31,  # GPU memory page fault: typically a bad pointer in the application
        43,  # GPU stopped processing: the application hit a fault and was stopped
        45,  # preemptive cleanup: the driver tidied up after a killed or faulting application
        68,  # video processor exception: NVDEC/NVENC hit bad input
        109,  # context switch timeout: a kernel would not yield, usually an application problem
    }
)

#: XIDs after which the GPU cannot work again without a reset, so probing it would only flap its health.
NEVER_RECOVER: frozenset[int] = frozenset({79})  # 79: the GPU has fallen off the bus

#: Short names for the XIDs people meet, used in log lines. Not a policy: unknown XIDs just show the number.
XID_NAMES: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    68: "video processor exception",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
}

_XID = re.compile(r"[0-9]+")
_ALL = frozenset({"all", "xids"})


def xid_name(xid: int) -> str:
    """`XID 48 (double-bit ECC error)`, or `XID 4242` when the code has no name here."""
    name = XID_NAMES.get(xid)
    return f"XID {xid} ({name})" if name else f"XID {xid}"


def _parse(variable: str, raw: str | None) -> tuple[bool, frozenset[int], list[str]]:
    """(`all` given, the XIDs listed, warnings) for one variable's raw value."""
    everything = False
    xids: set[int] = set()
    warnings: list[str] = []
    for entry in (raw or "").lower().split(","):
        entry = entry.strip()
        if not entry:
            continue  # "68," and ",68" are fine, as upstream has it
        if entry in _ALL:
            everything = True
        elif _XID.fullmatch(entry) and int(entry) > 0:
            xids.add(int(entry))
        else:
            # Upstream drops these with a log line nobody reads; we keep them for the start-up log.
            warnings.append(f"{variable}: ignoring {entry!r}: not an XID (a positive integer), 'all' or 'xids'")
    return everything, frozenset(xids), warnings


def _xid_list(xids: frozenset[int]) -> str:
    return ", ".join(str(x) for x in sorted(xids))


@dataclass(frozen=True, slots=True)
class XidPolicy:
    """Which XIDs are critical. `XidPolicy()` is the default: every XID except `DEFAULT_IGNORED`."""

    #: DISABLE was `all` or `xids`.
    disable_all: bool = False
    #: ENABLE was `all` or `xids`: every XID is critical, DISABLE notwithstanding.
    enable_all: bool = False
    #: XIDs never critical (unless enabled): the listed ones plus `DEFAULT_IGNORED`.
    disabled: frozenset[int] = DEFAULT_IGNORED
    #: XIDs always critical.
    enabled: frozenset[int] = frozenset()
    #: One line per malformed entry, naming the variable and the entry.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_env(cls, disable: str | None, enable: str | None) -> XidPolicy:
        """The policy for raw `DP_DISABLE_HEALTHCHECKS` and `DP_ENABLE_HEALTHCHECKS` values (None when unset)."""
        disable_all, disabled, warnings = _parse("DP_DISABLE_HEALTHCHECKS", disable)
        enable_all, enabled, enable_warnings = _parse("DP_ENABLE_HEALTHCHECKS", enable)
        return cls(
            disable_all=disable_all,
            enable_all=enable_all,
            disabled=disabled | DEFAULT_IGNORED,
            enabled=enabled,
            warnings=(*warnings, *enable_warnings),
        )

    def is_critical(self, xid: int) -> bool:
        """Does this XID make the GPU (or the MIG device it names) Unhealthy?"""
        if self.enable_all or xid in self.enabled:
            return True
        if self.disable_all:
            return False
        return xid not in self.disabled

    @property
    def ecc_critical(self) -> bool:
        """Does a double-bit ECC event (which carries no XID) count? Yes unless checks are disabled wholesale: an
        XID allow-list under `DISABLE=all` names XIDs, not ECC events."""
        return self.enable_all or not self.disable_all

    @property
    def checks_disabled(self) -> bool:
        """Nothing can ever be critical: the health loop need not listen to NVML at all."""
        return self.disable_all and not self.enable_all and not self.enabled

    def describe(self) -> str:
        """One line for the start-up log: what counts, and why."""
        if self.enable_all:
            return "health checks on: every XID and double-bit ECC errors are critical (DP_ENABLE_HEALTHCHECKS=all)"
        if self.checks_disabled:
            return "health checks off: no XID is critical (DP_DISABLE_HEALTHCHECKS=all)"
        if self.disable_all:
            return (
                f"health checks on for XIDs {_xid_list(self.enabled)} only "
                "(DP_DISABLE_HEALTHCHECKS=all with DP_ENABLE_HEALTHCHECKS)"
            )
        ignored = self.disabled - self.enabled
        text = "health checks on: every XID and double-bit ECC errors are critical"
        return f"{text} except {_xid_list(ignored)}" if ignored else text
