"""`python -m bench --against PATH`: NVIDIA's Go device plugin (a binary the user built; nothing of it is in this
repository) through the same scenarios, against the same fake NVML and the same grpcio kubelet emulator.

The Go plugin gets the simulated node's fake `libnvidia-ml.so.1` through `LD_LIBRARY_PATH` (and its state file
through the variable the fake reads), the simulated host root as `--nvidia-driver-root`, and upstream's defaults
otherwise. Upstream always puts its sockets in `/var/lib/kubelet/device-plugins/`: the benchmark gives it a private
mount namespace (`unshare -m`, private propagation) in which a scratch directory is bound over `/var/lib`, so its
`/var/lib/kubelet/device-plugins/` is the emulator's directory and nothing on the host changes. That needs root and
`unshare`; without them the comparison is reported unavailable, with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness import FigureError, Nvdp, Unavailable
from nvdp import sim
from nvdp.sim.build import build_fake_nvml
from nvdp.testing.kubelet_emulator import KubeletEmulator

#: Where upstream's plugin looks for the kubelet and puts its sockets (pluginapi.DevicePluginPath).
UPSTREAM_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
#: Inside the namespace the scratch directory is bound over this one.
BOUND = Path("/var/lib")
#: Mounts the scratch directory (argument 0) over /var/lib, then runs the plugin with the remaining arguments.
_IN_NAMESPACE = 'mount --bind "$0" /var/lib && exec "$@"'


def namespace_problem() -> str | None:
    """Why the Go plugin cannot get its private /var/lib here (None: it can)."""
    if os.geteuid() != 0:
        return "the Go plugin needs a private mount namespace (its socket directory is fixed), which needs root"
    missing = [tool for tool in ("unshare", "mount", "sh") if shutil.which(tool) is None]
    if missing:
        return f"the Go plugin needs a private mount namespace, and {', '.join(missing)} is not installed"
    return None


def upstream_flags(driver_root: Path) -> list[str]:
    """Upstream's defaults, spelled out, with the simulated host as the driver root (its /dev nodes and sysfs)."""
    return ["--mig-strategy=none", "--fail-on-init-error=true", "--pass-device-specs=false",
            "--device-list-strategy=envvar", "--device-id-strategy=uuid", f"--nvidia-driver-root={driver_root}"]


@dataclass
class Foreign(Nvdp):
    """The plugin at `binary` in its own mount namespace, on the simulated node `node`, with the kubelet emulator
    listening where upstream expects it. Same interface as `Nvdp` (the scenarios take either)."""

    binary: Path = Path()
    #: Time to enter the namespace, bind the directory and exec (`true` in place of the plugin), measured once per
    #: start; the start-up figure of a foreign plugin has it subtracted.
    setup_ms: float = 0.0

    def start(self) -> None:
        problem = namespace_problem()
        if problem is not None:
            raise Unavailable(problem)
        self._plugin_tmp = tempfile.TemporaryDirectory(prefix="nvdp-g-")
        scratch = Path(self._plugin_tmp.name) / "lib"
        plugin_dir = scratch / UPSTREAM_PLUGIN_DIR.relative_to(BOUND)
        self.kubelet = KubeletEmulator(plugin_dir)
        self.kubelet.start()
        saved = os.environ.get(sim.STATE_ENV)
        try:
            handle = sim.activate(sim.load_node(self.node), self.workdir / "sim")
        finally:  # the benchmark process itself must not point later children at this node
            if saved is None:
                os.environ.pop(sim.STATE_ENV, None)
            else:
                os.environ[sim.STATE_ENV] = saved
        library_dir = build_fake_nvml().parent
        env = {**os.environ, "METRICS_ADDRESS": "", sim.STATE_ENV: str(handle.state_file), **self.env,
               "LD_LIBRARY_PATH": os.pathsep.join(
                   p for p in (str(library_dir), os.environ.get("LD_LIBRARY_PATH", "")) if p)}
        prefix = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", _IN_NAMESPACE, str(scratch)]
        try:
            self.setup_ms = _time_setup(prefix)
        except FigureError:
            self.stop()
            raise
        argv = [*prefix, str(self.binary), *upstream_flags(handle.host_root), *self.args]
        log = self.log_path.open("wb")
        self.spawned_at = time.monotonic()
        self.process = subprocess.Popen(argv, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()


def _time_setup(prefix: Sequence[str]) -> float:
    started = time.monotonic()
    done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    elapsed = 1000 * (time.monotonic() - started)
    if done.returncode != 0:
        raise FigureError(f"cannot enter a private mount namespace: {done.stderr.decode(errors='replace').strip()}")
    return elapsed
