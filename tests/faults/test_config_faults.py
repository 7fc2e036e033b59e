"""The per-node config directory misbehaving under the running daemon: vanishing, a config replaced by a directory,
a half-written file, a symlink loop. Through all of it the daemon keeps serving the last good config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import nvdp.node_config.sources
from nvdp.core.config.settings import Settings, resolve
from nvdp.daemon import NodeConfig
from nvdp.node_config import ConfigSources, read_config_dir
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.harness import GPU0, LogWatch, answers, daemon, eventually, until

#: The daemon's report of an update that keeps the running config (no config to serve).
KEEPING = r"^config: default \(keeping config 'default'\)$"
REJECTED = r"^config rejected: "


class Scans:
    """Wraps the config watcher's directory read: how many started, and what each returned, in order."""

    def __init__(self) -> None:
        self.started = 0
        self.done: list[tuple[int, dict[str, bytes]]] = []

    def __call__(self, directory: Path) -> dict[str, bytes]:
        self.started += 1  # one watcher, one read at a time
        number = self.started
        result = read_config_dir(directory)
        self.done.append((number, result))
        return result

    def after(self, mark: int) -> list[dict[str, bytes]]:
        """What the reads that started after `mark` (a value of `started`) returned."""
        return [result for number, result in self.done if number > mark]

def sliced(replicas: int) -> str:
    return ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
            f"    - name: nvidia.com/gpu\n      replicas: {replicas}\n")


def count(k: KubeletEmulator) -> int:
    return len(k.devices("nvidia.com/gpu"))


async def test_config_directory_faults(
    two_gpu_node: Path, kubelet: KubeletEmulator, tmp_path: Path, logs: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    scans = Scans()
    monkeypatch.setattr(nvdp.node_config.sources, "read_config_dir", scans)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "default").write_text(sliced(2))

    def make_settings(parsed: object, source: str) -> Settings:
        return resolve({"simulate": str(two_gpu_node), "kubelet_socket": str(kubelet.socket),
                        "metrics_address": ""}, {}, parsed, config_source=source)  # type: ignore[arg-type]

    node_config = NodeConfig(ConfigSources(config_dir=configs, default_config="default"), None, make_settings)
    async with daemon(make_settings(None, "flags"), node_config=node_config):
        await until(kubelet, lambda k: count(k) == 4)

        # 1. A half-written file (a writer that closed before finishing): rejected, the old plan keeps serving;
        #    then the rest of it: applied. Each write is one update (its CLOSE_WRITE), each update one rejection:
        #    the witness that the daemon has seen it.
        text = sliced(3)
        for partial in (text[: len(text) // 2], text[: len(text) - 3]):
            mark = len(logs.records)
            (configs / "default").write_text(partial)
            await logs.wait(REJECTED, after=mark)
        await answers(kubelet, "nvidia.com/gpu", f"{GPU0}::1", visible_as=GPU0)
        assert count(kubelet) == 4
        (configs / "default").write_text(text)
        await until(kubelet, lambda k: count(k) == 6, what="the completed file applied")

        # 2. The directory vanishes: the config in use is kept (and the daemon says so).
        mark = len(logs.records)
        shutil.rmtree(configs)
        await logs.wait(KEEPING, after=mark)
        await answers(kubelet, "nvidia.com/gpu", f"{GPU0}::2", visible_as=GPU0)
        assert count(kubelet) == 6
        # ...and comes back with new content: applied.
        configs.mkdir()
        (configs / "default").write_text(sliced(2))
        await until(kubelet, lambda k: count(k) == 4, what="the re-created directory followed")

        # 3. The config file replaced by a directory: nothing to read, the config in use is kept. The daemon
        #    reports the file's removal; a directory is not a config (what the watcher reads says so), and its
        #    creation is not even an event the watcher acts on.
        mark = len(logs.records)
        (configs / "default").unlink()
        (configs / "default").mkdir()
        await logs.wait(KEEPING, after=mark)
        assert read_config_dir(configs) == {}
        await answers(kubelet, "nvidia.com/gpu", f"{GPU0}::1", visible_as=GPU0)
        assert count(kubelet) == 4
        (configs / "default").rmdir()

        # 4. A symlink loop under the config's name: not a readable file, the config in use is kept. The witness:
        #    the watcher read the directory after the loop was there, and found no config.
        mark = scans.started
        (configs / "default").symlink_to(configs / "default")
        await eventually(lambda: bool(scans.after(mark)), "the directory read again after the symlink loop")
        assert all(configs_read == {} for configs_read in scans.after(mark)), scans.after(mark)
        await answers(kubelet, "nvidia.com/gpu", f"{GPU0}::1", visible_as=GPU0)
        assert count(kubelet) == 4
        (configs / "default").unlink()
        (configs / "default").write_text(sliced(4))
        await until(kubelet, lambda k: count(k) == 8, what="a good config after the loop")
        assert set(kubelet.devices("nvidia.com/gpu").values()) == {"Healthy"}
