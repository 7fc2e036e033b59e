"""Named configs from a directory (real inotify) and through the API, chosen by the node label (fake API server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from nvdp.core.config.errors import ConfigError
from nvdp.k8s.client import open_client
from nvdp.k8s.watch import WatchOptions
from nvdp.node_config import (
    ConfigSources,
    ConfigUpdate,
    parse_config_map_ref,
    read_config_dir,
    watch_config,
    watch_config_dir,
)
from tests.fake_apiserver import FakeApiServer, follow, open_fake_apiserver
from tests.harness import LogWatch

LABEL = "nvidia.com/device-plugin.config"
FAST = WatchOptions(backoff_initial_s=0.02, backoff_max_s=0.1, min_stream_s=0.05)
A = b"version: v1\n"
B = b"version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"
C = b"version: v1\nflags:\n  migStrategy: mixed\n"


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _configmap_volume(directory: Path, contents: dict[str, bytes], version: int) -> None:
    """Publish `contents` the way the kubelet updates a ConfigMap volume: a new timestamped directory, `..data`
    swapped to it by a rename, per-key symlinks added or removed, the old directory deleted."""
    stamp = directory / f"..2026_11_26_00_00_{version:02d}.000000001"
    stamp.mkdir()
    for key, data in contents.items():
        (stamp / key).write_bytes(data)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.symlink(stamp.name, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", directory / "..data")
    for key in contents:
        if not (directory / key).is_symlink():
            os.symlink(f"..data/{key}", directory / key)
    for entry in os.listdir(directory):
        if not entry.startswith("..") and entry not in contents:
            os.unlink(directory / entry)
    if old is not None:
        for item in (directory / old).iterdir():
            item.unlink()
        (directory / old).rmdir()


async def test_directory_of_plain_files(tmp_path: Path) -> None:
    _write(tmp_path / "a", A)
    _write(tmp_path / "b", B)
    _write(tmp_path / "..ignored", b"x")
    (tmp_path / "subdir").mkdir()
    assert read_config_dir(tmp_path) == {"a": A, "b": B}
    async with follow(watch_config_dir(tmp_path, settle_s=0.01)) as states:
        assert await states.next() == {"a": A, "b": B}
        _write(tmp_path / "c", C)
        assert await states.next() == {"a": A, "b": B, "c": C}
        # An editor's save: a temporary file renamed over the old one.
        _write(tmp_path / ".a.swp", B)
        os.rename(tmp_path / ".a.swp", tmp_path / "a")
        assert await states.next() == {"a": B, "b": B, "c": C}
        (tmp_path / "b").unlink()
        assert await states.next() == {"a": B, "c": C}
        _write(tmp_path / "..also-ignored", b"y")
        (tmp_path / "subdir" / "nested").write_bytes(b"z")
        # Those yield nothing. The witness that the watcher is past them: the next state is the one of a later
        # write, and nothing came before it.
        _write(tmp_path / "d", A)
        assert await states.next() == {"a": B, "c": C, "d": A}
        assert states.pending() == []


async def test_configmap_volume_swap(tmp_path: Path) -> None:
    volume = tmp_path / "named"
    volume.mkdir()
    _configmap_volume(volume, {"a": A, "b": B}, 1)
    assert read_config_dir(volume) == {"a": A, "b": B}
    async with follow(watch_config_dir(volume, settle_s=0.01)) as states:
        assert await states.next() == {"a": A, "b": B}
        _configmap_volume(volume, {"a": A, "b": C, "c": C}, 2)
        assert await states.next() == {"a": A, "b": C, "c": C}
        _configmap_volume(volume, {"c": A}, 3)
        assert await states.next() == {"c": A}


async def test_directory_created_later(tmp_path: Path) -> None:
    directory = tmp_path / "later"
    async with follow(watch_config_dir(directory, settle_s=0.01)) as states:
        assert await states.next() == {}
        directory.mkdir()
        _write(directory / "a", A)
        assert await states.next() == {"a": A}  # {} again would be no change, so not yielded
        # Removed and re-created: followed again.
        (directory / "a").unlink()
        directory.rmdir()
        directory.mkdir()
        _write(directory / "b", B)
        while (state := await states.next()) != {"b": B}:
            assert state == {}


async def test_directory_selection_without_a_label(tmp_path: Path) -> None:
    _write(tmp_path / "a", A)
    _write(tmp_path / "b", B)
    sources = ConfigSources(config_dir=tmp_path, default_config="a", fallbacks=("named", "single"))
    async with follow(watch_config(sources, settle_s=0.01)) as updates:
        first: ConfigUpdate = await updates.next()
        assert (first.name, first.text, first.source, first.problem, first.changed) == (
            "a", A, str(tmp_path / "a"), None, True)
        assert "--default-config" in first.reason
        _write(tmp_path / "a", C)  # the selected config edited in place: reload
        update = await updates.next()
        assert (update.name, update.text, update.changed) == ("a", C, True)
        _write(tmp_path / "other", B)  # not selected: nothing
        (tmp_path / "a").unlink()  # the default is gone and no fallback applies: keep serving, report
        update = await updates.next()
        assert (update.name, update.text, update.changed) == ("a", C, False)
        assert update.problem is not None and "default config 'a'" in update.problem
        _write(tmp_path / "default", B)  # the `named` fallback now applies
        update = await updates.next()
        assert (update.name, update.text, update.changed) == ("default", B, True)
        assert update.problem == "default config 'a' (--default-config) does not exist (available: b, default, other)"
        # Nothing else: the next update is the one of a later edit.
        _write(tmp_path / "default", C)
        update = await updates.next()
        assert (update.name, update.text, update.changed) == ("default", C, True)
        assert updates.pending() == []


async def test_nothing_to_serve_at_startup_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "a", A)
    _write(tmp_path / "b", B)
    sources = ConfigSources(config_dir=tmp_path, fallbacks=("named",))
    with pytest.raises(ConfigError, match="no config to serve"), trio.fail_after(20):
        async with watch_config(sources, settle_s=0.01) as updates:
            async for _ in updates:
                pass


def _label(fake: FakeApiServer, value: str | None) -> None:
    fake.patch_node_labels("n1", {LABEL: value})


async def test_node_label_selects_from_the_directory(tmp_path: Path) -> None:
    """The issue's acceptance sequence, at the level of updates."""
    _write(tmp_path / "A", A)
    _write(tmp_path / "B", B)
    sources = ConfigSources(config_dir=tmp_path, node_name="n1", default_config="A")
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "A"})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_config(sources, client, watch_options=FAST, settle_s=0.01)) as updates:
            update = await updates.next()
            assert (update.name, update.reason, update.problem) == ("A", f"node label {LABEL}=A", None)
            _label(fake, "B")
            update = await updates.next()
            assert (update.name, update.text, update.changed) == ("B", B, True)
            _label(fake, "C")  # unknown: keep B, report
            update = await updates.next()
            assert (update.name, update.text, update.changed) == ("B", B, False)
            assert update.problem is not None and f"{LABEL}=C names no config" in update.problem
            _write(tmp_path / "C", C)  # the missing config appears: applied
            update = await updates.next()
            assert (update.name, update.text, update.problem, update.changed) == ("C", C, None, True)
            _label(fake, None)  # label removed: the default
            update = await updates.next()
            assert (update.name, update.changed) == ("A", True)
            assert "--default-config" in update.reason
            _write(tmp_path / "A", b"not: [valid")  # content changes are passed on; validity is the daemon's call
            update = await updates.next()
            assert (update.name, update.text, update.source) == ("A", b"not: [valid", str(tmp_path / "A"))


async def test_unknown_label_at_startup_falls_back_and_says_so(tmp_path: Path) -> None:
    _write(tmp_path / "default", A)
    sources = ConfigSources(config_dir=tmp_path, node_name="n1")
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "C"})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_config(sources, client, watch_options=FAST, settle_s=0.01)) as updates:
            update = await updates.next()
            assert update.name == "default"
            assert update.problem is not None and "as if the label were unset" in update.problem
            _write(tmp_path / "C", C)
            update = await updates.next()
            assert (update.name, update.problem) == ("C", None)


async def test_configmap_through_the_api(tmp_path: Path) -> None:
    volume = tmp_path / "named"
    volume.mkdir()
    _write(volume / "a", A)
    _write(volume / "b", b"stale")
    sources = ConfigSources(config_dir=volume, config_map=("nvdp", "plugin-configs"), node_name="n1")
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "b"})
        fake.set_configmap("nvdp", "plugin-configs", {"a": A.decode(), "b": B.decode()})
        async with open_client(fake.api_config(token="token-1")) as client, \
                follow(watch_config(sources, client, watch_options=FAST, settle_s=0.01)) as updates:
            update = await updates.next()
            # The API's copy wins over the volume's (which the kubelet refreshes later).
            assert (update.name, update.text, update.source) == ("b", B, 'configmap nvdp/plugin-configs key "b"')
            # A new key is usable at once, with no volume refresh.
            fake.set_configmap("nvdp", "plugin-configs", {"a": A.decode(), "b": B.decode(), "n1-plan2": C.decode()})
            _label(fake, "n1-plan2")
            # The label and the ConfigMap come on two streams: the label may arrive first, and is then reported
            # as unknown for a moment, while b keeps serving.
            while (update := await updates.next()).name != "n1-plan2":
                assert (update.name, update.changed) == ("b", False)
                assert update.problem is not None and "n1-plan2 names no config" in update.problem
            assert (update.text, update.problem, update.changed) == (C, None, True)
            fake.set_configmap("nvdp", "plugin-configs", {"n1-plan2": A.decode()})  # edited in place
            update = await updates.next()
            assert (update.name, update.text, update.changed) == ("n1-plan2", A, True)
            fake.delete_configmap("nvdp", "plugin-configs")  # only the volume is left, without that key
            update = await updates.next()
            assert (update.name, update.text, update.changed) == ("n1-plan2", A, False)
            assert update.problem is not None and "configmap nvdp/plugin-configs does not exist" in update.problem


async def test_survives_the_api_server(tmp_path: Path, logs: LogWatch) -> None:
    """410 (relist), the server gone for a second, a rotated token: the label keeps steering."""
    _write(tmp_path / "A", A)
    _write(tmp_path / "B", B)
    token_file = tmp_path / "token"
    token_file.write_text("token-1")
    sources = ConfigSources(config_dir=tmp_path, node_name="n1")
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "A"})
        async with open_client(fake.api_config(token_file=token_file)) as client, \
                follow(watch_config(sources, client, watch_options=FAST, settle_s=0.01)) as updates:
            assert (await updates.next()).name == "A"
            await fake.wait_watching()
            fake.expire()
            _label(fake, "B")
            assert (await updates.next()).name == "B"
            async with fake.offline():
                mark = len(logs.records)
                _label(fake, "A")
                # Gone for a while: the cut watch and at least one refused attempt after it, each retried.
                await logs.wait(r"(retrying|reconnecting) in [0-9.]+ s$", after=mark, count=2)
            assert (await updates.next()).name == "A"
            fake.token = "token-2"
            token_file.write_text("token-2")
            fake.drop_watches()
            _label(fake, "B")
            assert (await updates.next()).name == "B"
            assert fake.count("list") >= 2


async def test_api_unreachable_at_startup(tmp_path: Path) -> None:
    _write(tmp_path / "default", A)
    _write(tmp_path / "B", B)
    sources = ConfigSources(config_dir=tmp_path, node_name="n1")
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {LABEL: "B"})
        async with open_client(fake.api_config(token="token-1")) as client:
            async with fake.offline():
                updates_cm = watch_config(sources, client, watch_options=FAST, startup_wait_s=0.2, settle_s=0.01)
                async with follow(updates_cm) as updates:
                    update = await updates.next()
                    assert update.name == "default"
                    assert update.problem is not None and "not read yet" in update.problem
                    # Deliberately leave while the server is still away; the next block shows the recovery.
            async with follow(watch_config(sources, client, watch_options=FAST, startup_wait_s=0.2,
                                           settle_s=0.01)) as updates:
                update = await updates.next()
                assert (update.name, update.problem) == ("B", None)


def test_parse_config_map_ref() -> None:
    assert parse_config_map_ref("nvdp/plugin-configs") == ("nvdp", "plugin-configs")
    assert parse_config_map_ref("plugin-configs", "kube-system") == ("kube-system", "plugin-configs")
    with pytest.raises(ConfigError, match="NAMESPACE/NAME"):
        parse_config_map_ref("plugin-configs")
    with pytest.raises(ConfigError, match="NAMESPACE/NAME"):
        parse_config_map_ref("a/b/c")
