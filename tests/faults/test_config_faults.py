"""The per-node config directory misbehaving under the running daemon: vanishing, a config replaced by a directory,
a half-written file, a symlink loop. Through all of it the daemon keeps serving the last good config."""

from __future__ import annotations

import shutil
from pathlib import Path

import trio

from nvdp.core.config.settings import Settings, resolve
from nvdp.daemon import NodeConfig
from nvdp.node_config import ConfigSources
from nvdp.testing.kubelet_emulator import KubeletEmulator
from tests.faults.conftest import GPU0, answers, daemon, until

#: Long enough for the directory watch (50 ms settle) and a reload to have acted on a fault, before checking that
#: nothing changed. Only "nothing changed" is asserted after it, so a slow machine cannot make it fail falsely.
SEEN_S = 0.3


def sliced(replicas: int) -> str:
    return ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
            f"    - name: nvidia.com/gpu\n      replicas: {replicas}\n")


def count(k: KubeletEmulator) -> int:
    return len(k.devices("nvidia.com/gpu"))


async def test_config_directory_faults(two_gpu_node: Path, kubelet: KubeletEmulator, tmp_path: Path) -> None:
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
        #    then the rest of it: applied.
        text = sliced(3)
        (configs / "default").write_text(text[: len(text) // 2])
        (configs / "default").write_text(text[: len(text) - 3])
        await trio.sleep(SEEN_S)
        await answers(kubelet, "nvidia.com/gpu", f"{GPU0}::1", visible_as=GPU0)
        assert count(kubelet) == 4
        (configs / "default").write_text(text)
        await until(kubelet, lambda k: count(k) == 6, what="the completed file applied")

        # 2. The directory vanishes: the config in use is kept.
        shutil.rmtree(configs)
        await trio.sleep(SEEN_S)
        await answers(kubelet, "nvidia.com/gpu", f"{GPU0}::2", visible_as=GPU0)
        assert count(kubelet) == 6
        # ...and comes back with new content: applied.
        configs.mkdir()
        (configs / "default").write_text(sliced(2))
        await until(kubelet, lambda k: count(k) == 4, what="the re-created directory followed")

        # 3. The config file replaced by a directory: nothing to read, the config in use is kept.
        (configs / "default").unlink()
        (configs / "default").mkdir()
        await trio.sleep(SEEN_S)
        await answers(kubelet, "nvidia.com/gpu", f"{GPU0}::1", visible_as=GPU0)
        assert count(kubelet) == 4
        (configs / "default").rmdir()

        # 4. A symlink loop under the config's name: not a readable file, the config in use is kept.
        (configs / "default").symlink_to(configs / "default")
        await trio.sleep(SEEN_S)
        await answers(kubelet, "nvidia.com/gpu", f"{GPU0}::1", visible_as=GPU0)
        assert count(kubelet) == 4
        (configs / "default").unlink()
        (configs / "default").write_text(sliced(4))
        await until(kubelet, lambda k: count(k) == 8, what="a good config after the loop")
        assert set(kubelet.devices("nvidia.com/gpu").values()) == {"Healthy"}
