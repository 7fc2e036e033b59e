"""Where named configs come from, and which one this node serves right now (docs/node-config.md).

- `sources`: the config directory (inotify, through `nvdp.inotify`) and the ConfigMap (through `nvdp.k8s`), each
  followed on its own; `ConfigSources` says which are in use and how to choose;
- `watch`: `watch_config()`, which combines them with the node label and `choose_config()` into `ConfigUpdate`s.

The daemon imports `ConfigSources`, `ConfigUpdate` and `watch_config` from here.
"""

from nvdp.node_config.sources import DATA_LINK, ConfigSources, parse_config_map_ref, read_config_dir, watch_config_dir
from nvdp.node_config.watch import ConfigUpdate, watch_config

__all__ = [
    "DATA_LINK",
    "ConfigSources",
    "ConfigUpdate",
    "parse_config_map_ref",
    "read_config_dir",
    "watch_config",
    "watch_config_dir",
]
