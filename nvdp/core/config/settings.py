"""Resolved settings: one precedence function over every option (flag > env > config file > default).

Each option is described once in `OPTIONS`: its command-line flags, its environment variables (upstream's names), its
place in the config file and how to parse and check it. `nvdp.cli` builds argparse from the same table, and
`resolve()` is the only place where the four sources meet. Below `nvdp.cli`, nothing reads `os.environ`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvdp.core.config.dra import DEFAULT_DRIVER_NAME as DEFAULT_DRA_DRIVER_NAME
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import ConfigWarning, config_warnings
from nvdp.core.config.schema import Config, yaml_key

DEFAULT_KUBELET_SOCKET = "/var/lib/kubelet/device-plugins/kubelet.sock"
DEFAULT_KUBELET_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
DEFAULT_KUBELET_PLUGINS_DIR = "/var/lib/kubelet/plugins"
DEVICE_LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
#: Upstream's default (the CDI spec's own `cdi.k8s.io/`): container runtimes read annotations with this prefix.
DEFAULT_CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "t", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "f", "false", "no", "n", "off"):
        return False
    raise ValueError("expected a boolean: true or false")


def parse_seconds(text: str) -> float:
    """Seconds as a number, or with a unit suffix: 300, 300s, 5m, 1h."""
    stripped = text.strip().lower()
    factor = {"s": 1, "m": 60, "h": 3600}.get(stripped[-1:])
    number = stripped[:-1] if factor else stripped
    value = float(number) * (factor or 1)
    if value < 0:
        raise ValueError("expected a non-negative duration")
    return value


def parse_bytes(text: str) -> int:
    """A size in bytes, with an optional binary or decimal suffix: 1073741824, 1Gi, 512Mi, 2G."""
    stripped = text.strip()
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    for suffix, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if stripped.endswith(suffix):
            return int(float(stripped[: -len(suffix)]) * factor)
    return int(stripped)


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_int_list(text: str) -> list[int]:
    """Whole numbers, comma-separated (upstream's int-slice flags): `0`, `0,1`; empty text is an empty list."""
    try:
        return [int(part) for part in parse_list(text)]
    except ValueError:
        raise ValueError("expected whole numbers separated by commas, e.g. 0") from None


@dataclass(frozen=True, slots=True)
class Option:
    """One setting and every place it can come from."""

    dest: str
    flags: tuple[str, ...]
    envs: tuple[str, ...]
    #: Path in the config file as attribute names, e.g. ("flags", "plugin", "pass_device_specs"); () = CLI only.
    config_path: tuple[str, ...]
    default: Any
    #: "str" | "bool" | "list" | "path" | "seconds" | "bytes" | "int" | "ints"
    kind: str = "str"
    choices: tuple[str, ...] = ()
    help: str = ""

    @property
    def yaml_path(self) -> str:
        return "$." + ".".join(yaml_key(p) for p in self.config_path)


OPTIONS: tuple[Option, ...] = (
    Option("mig_strategy", ("--mig-strategy",), ("MIG_STRATEGY",), ("flags", "mig_strategy"), "none",
           choices=("none", "single", "mixed"), help="how MIG devices are exposed"),
    Option("fail_on_init_error", ("--fail-on-init-error",), ("FAIL_ON_INIT_ERROR",),
           ("flags", "fail_on_init_error"), True, "bool",
           help="exit non-zero when NVML cannot start (false: log and wait)"),
    Option("driver_root", ("--driver-root", "--nvidia-driver-root"), ("NVIDIA_DRIVER_ROOT",),
           ("flags", "nvidia_driver_root"), "/", "path", help="root of the NVIDIA driver installation"),
    Option("dev_root", ("--dev-root", "--nvidia-dev-root"), ("NVIDIA_DEV_ROOT",), ("flags", "nvidia_dev_root"),
           None, "path", help="root under which /dev/nvidia* live on the host (default: the driver root)"),
    Option("pass_device_specs", ("--pass-device-specs",), ("PASS_DEVICE_SPECS",),
           ("flags", "plugin", "pass_device_specs"), False, "bool",
           help="return device nodes in Allocate (for the CPU manager's static policy)"),
    Option("device_list_strategy", ("--device-list-strategy",), ("DEVICE_LIST_STRATEGY",),
           ("flags", "plugin", "device_list_strategy"), ("envvar",), "list", choices=DEVICE_LIST_STRATEGIES,
           help="how devices are passed to the container runtime (comma list)"),
    Option("device_id_strategy", ("--device-id-strategy",), ("DEVICE_ID_STRATEGY",),
           ("flags", "plugin", "device_id_strategy"), "uuid", choices=("uuid", "index"),
           help="device IDs given to the container runtime"),
    Option("gdrcopy_enabled", ("--gdrcopy-enabled",), ("GDRCOPY_ENABLED",), ("flags", "gdrcopy_enabled"), False,
           "bool", help="set NVIDIA_GDRCOPY=enabled in containers"),
    Option("gds_enabled", ("--gds-enabled",), ("GDS_ENABLED",), ("flags", "gds_enabled"), False, "bool",
           help="set NVIDIA_GDS=enabled in containers"),
    Option("mofed_enabled", ("--mofed-enabled",), ("MOFED_ENABLED",), ("flags", "mofed_enabled"), False, "bool",
           help="set NVIDIA_MOFED=enabled in containers"),
    # CDI device lists and IMEX channels (upstream's flags, variables and config keys; docs/compatibility.md).
    Option("cdi_annotation_prefix", ("--cdi-annotation-prefix",), ("CDI_ANNOTATION_PREFIX",),
           ("flags", "plugin", "cdi_annotation_prefix"), DEFAULT_CDI_ANNOTATION_PREFIX,
           help="prefix of the CDI annotation key with the cdi-annotations device list strategy"),
    Option("imex_channel_ids", ("--imex-channel-ids",), ("IMEX_CHANNEL_IDS",), ("imex", "channel_ids"), None, "ints",
           help="IMEX channels given to every container that gets GPUs: none, or 0"),
    Option("imex_required", ("--imex-required",), ("IMEX_REQUIRED",), ("imex", "required"), False, "bool",
           help="refuse to serve when a requested IMEX channel does not exist on the node"),
    Option("mps_root", ("--mps-root",), ("MPS_ROOT",), ("flags", "mps_root"), "", "str",
           help="host directory for MPS pipes, logs and shm"),
    Option("shared_devices_allocation_policy", ("--shared-devices-allocation-policy",),
           ("SHARED_DEVICES_ALLOCATION_POLICY",), ("flags", "plugin", "shared_devices_allocation_policy"),
           "distributed", choices=("distributed", "packed"), help="preferred allocation among shared devices"),
    Option("device_discovery_strategy", ("--device-discovery-strategy",), ("DEVICE_DISCOVERY_STRATEGY",),
           ("flags", "device_discovery_strategy"), "auto", choices=("auto", "nvml"),
           help="how devices are found (nvdp discovers through NVML)"),
    Option("kubelet_socket", ("--kubelet-socket",), ("KUBELET_SOCKET",), (), DEFAULT_KUBELET_SOCKET, "str",
           help="the kubelet's registration socket; plugin sockets go in its directory"),
    Option("config_file", ("--config-file",), ("CONFIG_FILE",), (), None, "path", help="config file (YAML, v1)"),
    Option("simulate", ("--simulate",), ("NVDP_SIMULATE",), (), None, "path",
           help="run against a simulated GPU node described by this YAML file"),
    # Per-node configs (docs/node-config.md): a directory of named configs and/or a ConfigMap read through the
    # API, chosen by a node label.
    Option("config_dir", ("--config-dir",), ("CONFIG_FILE_SRCDIR",), (), None, "path",
           help="directory of named configs, one per file (a mounted ConfigMap)"),
    Option("config_map", ("--config-map",), ("CONFIG_MAP",), (), None,
           help="NAMESPACE/NAME of a ConfigMap of named configs, read through the Kubernetes API"),
    Option("node_name", ("--node-name",), ("NODE_NAME",), (), None, help="this node's name (for its label)"),
    Option("node_label", ("--node-label",), ("NODE_LABEL",), (), "nvidia.com/device-plugin.config",
           help="node label naming the config to use"),
    Option("default_config", ("--default-config",), ("DEFAULT_CONFIG",), (), None,
           help="config to use when the label is unset"),
    Option("fallback_strategies", ("--fallback-strategies",), ("FALLBACK_STRATEGIES",), (), "named,single",
           help="what to use when the label is unset and there is no default: named, single, empty"),
    Option("kubeconfig", ("--kubeconfig",), ("KUBECONFIG",), (), None,
           help="kubeconfig for the API (default: in-cluster service account)"),
    Option("pod_namespace", (), ("POD_NAMESPACE",), (), None, help="the pod's namespace (for --config-map NAME)"),
    Option("nfd_features_file", ("--nfd-features-file", "--output-file"), ("NFD_FEATURES_FILE", "GFD_OUTPUT_FILE"), (),
           "/etc/kubernetes/node-feature-discovery/features.d/nvdp", "path",
           help="node-feature-discovery local feature file for the GPU feature labels (written when its "
                "directory exists; empty disables)"),
    # GPU Feature Discovery in the same process (docs/labels.md): upstream GFD's flags where they apply.
    Option("label_sink", ("--label-sink",), ("LABEL_SINK",), (), "auto",
           choices=("auto", "file", "node-feature-api", "node", "none"),
           help="where the GFD labels go: the NFD local feature file, NFD's NodeFeature API, the Node's own labels, "
                "nowhere; auto: the NodeFeature API with --use-node-feature-api, else the file"),
    Option("use_node_feature_api", ("--use-node-feature-api",), ("GFD_USE_NODE_FEATURE_API", "USE_NODE_FEATURE_API"),
           (), False, "bool", help="publish the labels as an NFD NodeFeature object (with --label-sink auto)"),
    Option("no_timestamp", ("--no-timestamp",), ("GFD_NO_TIMESTAMP",), (), False, "bool",
           help="leave out nvidia.com/gfd.timestamp"),
    Option("machine_type_file", ("--machine-type-file",), ("GFD_MACHINE_TYPE_FILE",), (),
           "/sys/class/dmi/id/product_name", "path", help="file holding the machine type (nvidia.com/gpu.machine)"),
    Option("label_interval", ("--label-interval",), ("LABEL_INTERVAL",), (), 5.0, "seconds",
           help="at least this long between two label writes (reloads and health changes in between are batched)"),
    Option("pod_name", (), ("POD_NAME",), (), None, help="the pod's name (owner of the NodeFeature object)"),
    Option("log_level", ("--log-level",), ("LOG_LEVEL",), (), "info", choices=("debug", "info", "warning", "error"),
           help="log level"),
    Option("mps_shm_size", ("--mps-shm-size",), ("MPS_SHM_SIZE",), (), None, "bytes",
           help="size of the MPS clients' shm tmpfs at <mps root>/shm (e.g. 8Gi; default half of RAM)"),
    Option("mps_host_socket", ("--mps-host-socket",), ("MPS_HOST_SOCKET",), (), None, "path",
           help="socket of `nvdp mps-host`, which then runs the MPS control daemons so that they outlive nvdp "
                "(default: nvdp starts them itself, detached)"),
    Option("metrics_address", ("--metrics-address",), ("METRICS_ADDRESS",), (), ":9400",
           help="host:port for /metrics, /healthz and /readyz (empty disables)"),
    Option("log_format", ("--log-format",), ("LOG_FORMAT",), (), "text", choices=("text", "json"),
           help="log line format"),
    # Health checks: upstream reads these two variables directly and has no flags for them.
    Option("disable_healthchecks", (), ("DP_DISABLE_HEALTHCHECKS",), (), None,
           help="'all', 'xids', or XIDs to ignore besides the defaults"),
    Option("enable_healthchecks", (), ("DP_ENABLE_HEALTHCHECKS",), (), None,
           help="'all' or XIDs to treat as critical even if ignored by default"),
    Option("strict_config", ("--strict-config",), ("STRICT_CONFIG",), ("flags", "strict_config"), False, "bool",
           help="treat config warnings (what upstream accepts and nvdp serves with upstream's meaning, e.g. an "
                "unknown key) as errors"),
    Option("mps_probe_timeout", ("--mps-probe-timeout",), ("MPS_PROBE_TIMEOUT",), (), 3.0, "seconds",
           help="how long one MPS control daemon probe (or control command) may take before it counts as failed"),
    Option("mps_probe_failures", ("--mps-probe-failures",), ("MPS_PROBE_FAILURES",), (), 3, "int",
           help="failed MPS probes in a row before a daemon's replicas are reported Unhealthy"),
    Option("health_quiet_period", ("--health-quiet-period",), ("HEALTH_QUIET_PERIOD",), (), "300", "seconds",
           help="seconds without a new critical XID before an Unhealthy GPU is probed and may return to Healthy"),
    # DRA (docs/dra.md): the kubelet plugin for resource.k8s.io/v1 beside the device plugin.
    Option("dra_enabled", ("--dra",), ("DRA_ENABLED",), ("dra", "enabled"), False, "bool",
           help="serve the GPUs chosen by dra.devices (default all) through DRA instead of the device plugin"),
    Option("dra_driver_name", ("--dra-driver-name",), ("DRA_DRIVER_NAME",), ("dra", "driver_name"),
           DEFAULT_DRA_DRIVER_NAME, help="the DRA driver name (NVIDIA's, so its DeviceClasses and claims work)"),
    Option("kubelet_registry_dir", ("--kubelet-registry-dir",), ("KUBELET_REGISTRY_DIR",), (),
           DEFAULT_KUBELET_REGISTRY_DIR, "path", help="the kubelet's plugin registration directory (DRA)"),
    Option("kubelet_plugins_dir", ("--kubelet-plugins-dir",), ("KUBELET_PLUGINS_DIR",), (),
           DEFAULT_KUBELET_PLUGINS_DIR, "path",
           help="the kubelet's plugins directory; the DRA socket is <dir>/<driver name>/dra.sock"),
    # CDI (docs/cdi.md): the spec files nvdp writes when a device list strategy starts with cdi-.
    Option("cdi_root", ("--cdi-root",), ("CDI_ROOT",), (), "/var/run/cdi", "path",
           help="directory nvdp writes its CDI spec files into (a container runtime's CDI spec directory)"),
    Option("nvidia_cdi_hook_path", ("--nvidia-cdi-hook-path", "--nvidia-ctk-path"),
           ("NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH"), ("flags", "plugin", "nvidia_ctk_path"), "/usr/bin/nvidia-ctk",
           help="host path of nvidia-ctk or nvidia-cdi-hook, which the CDI specs' hooks run"),
    Option("container_driver_root", ("--container-driver-root", "--driver-root-ctr-path"),
           ("CONTAINER_DRIVER_ROOT", "DRIVER_ROOT_CTR_PATH"), ("flags", "plugin", "container_driver_root"),
           "/driver-root", "path",
           help="where the host's driver root is mounted in nvdp's container (CDI host paths are rewritten from it "
                "to --nvidia-driver-root)"),
    Option("cdi_feature_flags", ("--cdi-feature-flags",), ("CDI_FEATURE_FLAGS",), (), "",
           help="CDI generation feature flags (comma list): disable-ipc-discoverer, disable-nvsandboxutils"),
    Option("cdi_disable_hooks", ("--cdi-disable-hooks",), ("CDI_DISABLE_HOOKS",), (), "",
           help="CDI hooks to leave out of the specs (comma list of hook names, or all)"),
)

OPTIONS_BY_DEST = {o.dest: o for o in OPTIONS}


@dataclass(frozen=True, slots=True)
class Settings:
    mig_strategy: str = "none"
    fail_on_init_error: bool = True
    driver_root: Path = Path("/")
    dev_root: Path = Path("/")
    pass_device_specs: bool = False
    device_list_strategy: tuple[str, ...] = ("envvar",)
    device_id_strategy: str = "uuid"
    gdrcopy_enabled: bool = False
    gds_enabled: bool = False
    mofed_enabled: bool = False
    #: Upstream's: the key of the one CDI annotation is `<prefix>nvidia-device-plugin_<uuid4>`.
    cdi_annotation_prefix: str = DEFAULT_CDI_ANNOTATION_PREFIX
    #: IMEX channels to pass (only `()` or `(0,)`, as upstream), and whether a missing one refuses the config.
    imex_channel_ids: tuple[int, ...] = ()
    imex_required: bool = False
    mps_root: str = ""
    shared_devices_allocation_policy: str = "distributed"
    device_discovery_strategy: str = "auto"
    #: None: do not register with a kubelet (upstream: an empty --kubelet-socket).
    kubelet_socket: Path | None = Path(DEFAULT_KUBELET_SOCKET)
    config_file: Path | None = None
    simulate: Path | None = None
    log_level: str = "info"
    disable_healthchecks: str | None = None
    enable_healthchecks: str | None = None
    health_quiet_period: float = 300.0
    #: Bound on one MPS control command, and failed probes in a row before a daemon counts as down (docs/mps.md).
    mps_probe_timeout: float = 3.0
    mps_probe_failures: int = 3
    mps_shm_size: int | None = None
    #: `nvdp mps-host`'s socket: the daemons are the host's (docs/mps.md); None: nvdp starts them itself.
    mps_host_socket: Path | None = None
    #: Empty (no HTTP endpoint) unless given: embedded daemons (tests, the demo) must not collide on a port. The
    #: command line's default is ":9400".
    metrics_address: str = ""
    log_format: str = "text"
    config_dir: Path | None = None
    config_map: str | None = None
    node_name: str | None = None
    node_label: str = "nvidia.com/device-plugin.config"
    default_config: str | None = None
    fallback_strategies: tuple[str, ...] = ("named", "single")
    kubeconfig: str | None = None
    pod_namespace: str | None = None
    #: None (not written) unless given; the command line's default is NFD's features.d/nvdp.
    nfd_features_file: Path | None = None
    #: Config warnings are errors (`--strict-config`).
    strict_config: bool = False
    #: GPU Feature Discovery's labels (docs/labels.md): where they go, and GFD's options.
    label_sink: str = "auto"
    use_node_feature_api: bool = False
    no_timestamp: bool = False
    machine_type_file: Path | None = None
    label_interval: float = 5.0
    pod_name: str | None = None
    #: The DRA kubelet plugin (docs/dra.md); which GPUs it serves is the config's `dra.devices`.
    dra_enabled: bool = False
    dra_driver_name: str = DEFAULT_DRA_DRIVER_NAME
    kubelet_registry_dir: Path = Path(DEFAULT_KUBELET_REGISTRY_DIR)
    kubelet_plugins_dir: Path = Path(DEFAULT_KUBELET_PLUGINS_DIR)
    #: The parsed config file (or an empty one): the sharing sections are read from here.
    config: Config = field(default_factory=Config)
    #: CDI (docs/cdi.md). None: no spec file is written or removed (embedded daemons and tests must not touch the
    #: host's /var/run/cdi); the command line's default is /var/run/cdi.
    cdi_root: Path | None = None
    nvidia_cdi_hook_path: str = "/usr/bin/nvidia-ctk"
    container_driver_root: Path = Path("/driver-root")
    cdi_feature_flags: tuple[str, ...] = ()
    cdi_disable_hooks: tuple[str, ...] = ()

    @property
    def cdi_enabled(self) -> bool:
        """Any device list strategy is a CDI one: nvdp writes the CDI specs (as upstream)."""
        return any(s.startswith("cdi-") for s in self.device_list_strategy)

    @property
    def cdi_feature_classes(self) -> tuple[str, ...]:
        """The CDI classes with one `all` device that are switched on, in upstream's order."""
        return tuple(c for c, on in (("gdrcopy", self.gdrcopy_enabled), ("gds", self.gds_enabled),
                                     ("mofed", self.mofed_enabled)) if on)

    @property
    def plugin_dir(self) -> Path | None:
        return self.kubelet_socket.parent if self.kubelet_socket else None

    @property
    def config_warnings(self) -> tuple[ConfigWarning, ...]:
        """What the config file asks that nvdp serves with upstream's or the fork's meaning (docs/compatibility.md)."""
        return config_warnings(self.config)


def _from_file(config: Config, path: tuple[str, ...]) -> Any:
    node: Any = config
    for name in path:
        node = getattr(node, name, None)
        if node is None:
            return None
    return node


#: Accepted range of each numeric kind, (lowest, highest), both included. Every number from a flag or an
#: environment variable is checked against it, and for finiteness, before the daemon starts: `inf`, `nan` and
#: `1e400` (which float() reads as inf) are refused with the flag or variable named.
NUMERIC_RANGES: dict[str, tuple[float, float]] = {
    # A week: far above any sensible quiet period or timeout, far below what overflows a deadline.
    "seconds": (0.0, 7 * 24 * 3600.0),
    # 1 byte to 1 PiB: above any node's RAM, below what overflows anything.
    "bytes": (1.0, float(1 << 50)),
    "int": (0.0, 1e6),
}
#: Per-option ranges that are narrower than their kind's (dest -> (lowest, highest)).
OPTION_RANGES: dict[str, tuple[float, float]] = {
    # Below 0.1 s no control program answers even on an idle node; above 5 minutes a hung daemon goes unnoticed.
    "mps_probe_timeout": (0.1, 300.0),
    "mps_probe_failures": (1.0, 100.0),
}


def _show(text: str) -> str:
    """A value as given, quoted and cut short for an error message."""
    return repr(text if len(text) <= 64 else text[:64] + "...")


def _check_number(option: Option, value: float, text: str, source: str) -> None:
    """Refuse a number that is not finite or outside the option's range, naming the source and the value."""
    low, high = OPTION_RANGES.get(option.dest) or NUMERIC_RANGES[option.kind]
    if not math.isfinite(value):
        raise ConfigError(f"{source}: invalid value {_show(text)}: expected a finite number")
    if not low <= value <= high:
        unit = {"seconds": " seconds", "bytes": " bytes"}.get(option.kind, "")
        raise ConfigError(f"{source}: invalid value {_show(text)}: out of range, expected {low:g} to {high:g}{unit}")


#: What nvdp refuses in a CDI annotation prefix (upstream takes any text): nothing that cannot start an
#: annotation key the runtime reads back as one (whitespace, control characters), nor a prefix so long that the
#: key could not be stored.
MAX_CDI_ANNOTATION_PREFIX = 253


def check_cdi_annotation_prefix(prefix: str, where: str) -> None:
    if not prefix:
        raise ConfigError(f"{where}: the CDI annotation prefix is empty: leave it unset for "
                          f"{DEFAULT_CDI_ANNOTATION_PREFIX!r}, the prefix container runtimes read")
    if len(prefix) > MAX_CDI_ANNOTATION_PREFIX or not prefix.isascii() or not prefix.isprintable() \
            or any(c.isspace() for c in prefix):
        raise ConfigError(f"{where}: invalid CDI annotation prefix {_show(prefix)}: expected at most "
                          f"{MAX_CDI_ANNOTATION_PREFIX} printable ASCII characters without spaces, e.g. "
                          f"{DEFAULT_CDI_ANNOTATION_PREFIX!r}")


def check_imex_channel_ids(ids: Sequence[int], where: str) -> None:
    """Upstream's rule and words (`AssertChannelIDsValid`): only channel 0 exists to be asked for."""
    if len(ids) == 0 or tuple(ids) == (0,):
        return
    # Go prints an []int as `[0 1]`; users search for upstream's message.
    found = "[" + " ".join(str(i) for i in ids) + "]"
    raise ConfigError(f"{where}: invalid IMEX channel IDs: invalid IMEX config: channelIDs must be [] or [0]; "
                      f"found {found}")


def _parse_text(option: Option, text: str, source: str) -> Any:
    """Parse a value given as text (a flag or an env var)."""
    try:
        if option.kind == "bool":
            return parse_bool(text)
        if option.kind == "list":
            return parse_list(text)
        if option.kind == "ints":
            return parse_int_list(text)
        if option.kind == "seconds":
            seconds = parse_seconds(text)
            _check_number(option, seconds, text, source)
            return seconds
        if option.kind == "int":
            try:
                number = int(text.strip())
            except ValueError:
                raise ValueError("expected a whole number") from None
            _check_number(option, number, text, source)
            return number
        if option.kind == "bytes":
            size = _parse_size(text)
            _check_number(option, size, text, source)
            return int(size)
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid value {_show(text)}: {exc}") from None
    return text


def _parse_size(text: str) -> float:
    """`parse_bytes`, as a float so that inf and nan reach the range check instead of raising OverflowError."""
    try:
        return float(parse_bytes(text))
    except OverflowError:
        return math.inf


def _check(option: Option, value: Any, source: str) -> Any:
    """Normalise a value from any source and check it against the option's accepted values."""
    if option.kind == "list":
        items = [value] if isinstance(value, str) else list(value)
        for item in items:
            if item not in option.choices:
                raise ConfigError(
                    f"{source}: invalid value {item!r}: accepted values are {', '.join(option.choices)}")
        if not items:
            raise ConfigError(f"{source}: must name at least one of {', '.join(option.choices)}")
        return tuple(dict.fromkeys(items))
    if option.choices and value not in option.choices:
        raise ConfigError(f"{source}: invalid value {value!r}: accepted values are {', '.join(option.choices)}")
    if option.kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{source}: invalid value {value!r}: expected true or false")
    if option.kind == "ints":
        return tuple(value)
    if option.kind in NUMERIC_RANGES and isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(option, float(value), str(value), source)
    return value


def resolve(
    cli: Mapping[str, str | None],
    env: Mapping[str, str],
    config: Config | None = None,
    config_source: str = "config file",
) -> Settings:
    """Combine the four sources. `cli` maps an option's dest to the text given on the command line, or None."""
    config = config or Config()
    values: dict[str, Any] = {}
    #: Where each value came from (a flag, an env var, `file: $.key`, or "default"), for error messages.
    origins: dict[str, str] = {}
    for option in OPTIONS:
        given = cli.get(option.dest)
        env_name = next((name for name in option.envs if name in env), None)
        from_file = _from_file(config, option.config_path) if option.config_path else None
        if given is not None:
            origin = option.flags[0]
            value = _check(option, _parse_text(option, given, origin), origin)
        elif env_name is not None:
            origin = env_name
            value = _check(option, _parse_text(option, env[env_name], origin), origin)
        elif from_file is not None:
            origin = f"{config_source}: {option.yaml_path}"
            value = _check(option, from_file, origin)
        else:
            origin, value = "default", option.default
        origins[option.dest] = origin
        values[option.dest] = value

    values["imex_channel_ids"] = tuple(values["imex_channel_ids"] or ())
    if isinstance(values["health_quiet_period"], str):
        values["health_quiet_period"] = parse_seconds(values["health_quiet_period"])
    values["fallback_strategies"] = tuple(parse_list(values["fallback_strategies"] or ""))
    for dest in ("driver_root", "dev_root", "config_file", "simulate", "config_dir", "nfd_features_file",
                 "machine_type_file", "kubelet_registry_dir", "kubelet_plugins_dir"):
        if values[dest] not in (None, ""):
            values[dest] = Path(values[dest])
        else:
            values[dest] = None
    values["driver_root"] = values["driver_root"] or Path("/")
    values["kubelet_registry_dir"] = values["kubelet_registry_dir"] or Path(DEFAULT_KUBELET_REGISTRY_DIR)
    values["kubelet_plugins_dir"] = values["kubelet_plugins_dir"] or Path(DEFAULT_KUBELET_PLUGINS_DIR)
    # Upstream: an unset or empty dev root means the driver root.
    values["dev_root"] = values["dev_root"] or values["driver_root"]
    values["kubelet_socket"] = Path(values["kubelet_socket"]) if values["kubelet_socket"] else None
    values["cdi_root"] = Path(values["cdi_root"]) if values["cdi_root"] else None
    values["container_driver_root"] = Path(values["container_driver_root"] or "/driver-root")
    for dest in ("cdi_feature_flags", "cdi_disable_hooks"):
        given = values[dest]
        values[dest] = tuple(parse_list(given) if isinstance(given, str) else given or ())
    settings = Settings(config=config, **values)
    validate(settings, config_source, origins)
    check_strict(settings.config_warnings, settings.strict_config, origins.get("strict_config", "default"))
    return settings


def check_strict(warnings: Sequence[ConfigWarning], strict: bool, origin: str = "--strict-config") -> None:
    """Under `--strict-config`, config warnings are one ConfigError listing them all."""
    if not strict or not warnings:
        return
    where = origin if origin != "default" else "--strict-config"
    raise ConfigError(f"{len(warnings)} config warning(s), errors under strict config ({where}): "
                      + "; ".join(str(w) for w in warnings))


def validate(
    settings: Settings, config_source: str = "config file", origins: Mapping[str, str] | None = None
) -> None:
    """Cross-field checks and refusals of what nvdp does not implement, each with what to do instead.
    `origins` says where each value came from (flag, env var, file key path) so the message can point there."""
    origins = origins or {}

    def where(dest: str) -> str:
        return origins.get(dest) or next(o.flags[0] for o in OPTIONS if o.dest == dest)

    check_cdi_annotation_prefix(settings.cdi_annotation_prefix, where("cdi_annotation_prefix"))
    check_imex_channel_ids(settings.imex_channel_ids, where("imex_channel_ids"))
    # Checked whether or not per-node configs are in use: a typo must not wait for the day --config-dir is added.
    from nvdp.core.config.selection import FALLBACK_STRATEGIES

    unknown_fallbacks = [f for f in settings.fallback_strategies if f not in FALLBACK_STRATEGIES]
    if unknown_fallbacks:
        raise ConfigError(f"{where('fallback_strategies')}: unknown fallback strategy {unknown_fallbacks[0]!r}: "
                          f"accepted values are {', '.join(FALLBACK_STRATEGIES)}")
    if settings.metrics_address.strip():
        try:
            parse_address(settings.metrics_address)
        except ValueError as exc:
            raise ConfigError(f"{where('metrics_address')}: {exc}") from None
    if settings.dra_enabled:
        _validate_dra(settings, where)
    _validate_cdi(settings, where)
    config = settings.config
    if config.version not in (None, "", "v1"):
        raise ConfigError(f"{config_source}: $.version: unknown version {config.version!r}: accepted values are v1")
    mps = config.sharing.mps if config.sharing is not None else None
    if mps is not None:
        # Checks that need no node; those that do (GPU exists, slices fit its memory) are in nvdp.core.plan.sharing.
        if not settings.mps_root:
            raise ConfigError(
                f"{config_source}: $.sharing.mps: using MPS requires --mps-root to be specified "
                "(flag --mps-root, env MPS_ROOT or flags.mpsRoot; usually /run/nvidia/mps)")
        if not settings.mps_root.startswith("/"):
            # Pipe and shm directories are mounted into client containers by host path: relative means nothing.
            raise ConfigError(f"{where('mps_root')}: the MPS root must be an absolute path, got {settings.mps_root!r}")
        if settings.mig_strategy == "mixed":
            raise ConfigError(
                f"{config_source}: $.sharing.mps: using --mig-strategy=mixed is not supported with MPS "
                "(MPS shares whole GPUs; use migStrategy none or single)")


#: A DRA driver name: a DNS subdomain of at most 63 characters (ResourceSlice `spec.driver`).
_DRIVER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")


def _validate_dra(settings: Settings, where: Any) -> None:
    name = settings.dra_driver_name
    if len(name) > 63 or not _DRIVER_NAME.match(name):
        raise ConfigError(f"{where('dra_driver_name')}: invalid DRA driver name {_show(name)}: expected a DNS "
                          "subdomain of at most 63 characters, e.g. gpu.nvidia.com")
    for dest in ("kubelet_registry_dir", "kubelet_plugins_dir"):
        if not getattr(settings, dest).is_absolute():
            raise ConfigError(f"{where(dest)}: must be an absolute path (the kubelet dials the DRA socket by its "
                              f"absolute path), got {str(getattr(settings, dest))!r}")


def check_dra_runnable(settings: Settings) -> None:
    """What `nvdp run` needs for DRA besides valid settings (`nvdp config validate` checks a config without them):
    the node's name, for its ResourceSlices and its claims."""
    if settings.dra_enabled and not settings.node_name:
        raise ConfigError("DRA is enabled (--dra, DRA_ENABLED or dra.enabled) but this node's name is unknown: set "
                          "--node-name (env NODE_NAME, usually from the pod's spec.nodeName)")


def cli_values(namespace: Any, options: Sequence[Option] = OPTIONS) -> dict[str, str | None]:
    """The raw text of each option given on the command line (argparse defaults are None)."""
    return {o.dest: getattr(namespace, o.dest, None) for o in options}


def parse_address(address: str) -> tuple[str | None, int]:
    """`host:port` -> (host, port). `:9400` means every interface (host None); IPv6 hosts go in brackets."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid address {address!r}: expected host:port, e.g. :9400 or 127.0.0.1:9400")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"invalid address {address!r}: put an IPv6 address in brackets, e.g. [::1]:9400")
    return host or None, int(port_text)


#: `--cdi-feature-flags` nvdp accepts: it acts on disable-ipc-discoverer; it never uses nvsandboxutils, so
#: disable-nvsandboxutils (which NVIDIA's DRA driver passes) already holds.
CDI_FEATURE_FLAGS = ("disable-ipc-discoverer", "disable-nvsandboxutils")
#: `--cdi-disable-hooks` names: the hooks nvdp writes, two it never writes (chmod, off by default upstream too, and
#: update-application-profile), and all.
CDI_HOOK_NAMES = ("create-symlinks", "enable-cuda-compat", "update-ldcache", "disable-device-node-modification",
                  "chmod", "update-application-profile", "all")


def _validate_cdi(settings: Settings, where: Any) -> None:
    unknown = [f for f in settings.cdi_feature_flags if f not in CDI_FEATURE_FLAGS]
    if unknown:
        raise ConfigError(f"{where('cdi_feature_flags')}: unknown CDI feature flag {unknown[0]!r}: accepted values "
                          f"are {', '.join(CDI_FEATURE_FLAGS)}")
    unknown = [h for h in settings.cdi_disable_hooks if h not in CDI_HOOK_NAMES]
    if unknown:
        raise ConfigError(f"{where('cdi_disable_hooks')}: unknown CDI hook {unknown[0]!r}: accepted values are "
                          f"{', '.join(CDI_HOOK_NAMES)}")
    if not settings.nvidia_cdi_hook_path.startswith("/"):
        raise ConfigError(f"{where('nvidia_cdi_hook_path')}: the CDI hook path must be an absolute host path, got "
                          f"{settings.nvidia_cdi_hook_path!r}")
