"""Writing CDI spec files: atomic, unchanged content left alone, only nvdp's stale files removed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nvdp.cdi import CdiError, writer
from nvdp.cdi.writer import remove_spec, sync_specs, write_spec
from nvdp.core.cdi.spec import ContainerEdits, Device, DeviceNode, Spec, render

PREFIX = "k8s.device-plugin.nvidia.com-"
GPU = "k8s.device-plugin.nvidia.com-gpu.json"


def gpu_spec(*names: str, kind: str = "k8s.device-plugin.nvidia.com/gpu") -> Spec:
    return Spec(kind=kind, devices=tuple(Device(n, ContainerEdits(device_nodes=(DeviceNode(f"/dev/{n}"),)))
                                         for n in names))


async def test_a_spec_is_written_whole_with_mode_0644_and_no_temporary_file_left(tmp_path: Path) -> None:
    root = tmp_path / "cdi"
    result = await sync_specs(root, {GPU: gpu_spec("nvidia0")}, PREFIX)
    assert result.written == (GPU,)
    assert (root / GPU).read_text() == render(gpu_spec("nvidia0"))
    assert stat.S_IMODE((root / GPU).stat().st_mode) == 0o644
    assert os.listdir(root) == [GPU]


async def test_unchanged_content_is_not_rewritten_and_changed_content_is_replaced(tmp_path: Path) -> None:
    await sync_specs(tmp_path, {GPU: gpu_spec("nvidia0")}, PREFIX)
    before = (tmp_path / GPU).stat()
    again = await sync_specs(tmp_path, {GPU: gpu_spec("nvidia0")}, PREFIX)
    assert (again.written, again.unchanged) == ((), (GPU,))
    assert (tmp_path / GPU).stat().st_ino == before.st_ino
    changed = await sync_specs(tmp_path, {GPU: gpu_spec("nvidia0", "nvidia1")}, PREFIX)
    assert changed.written == (GPU,)
    # Replaced by a rename, not rewritten in place: a runtime reading it sees the old file or the new one.
    assert (tmp_path / GPU).stat().st_ino != before.st_ino


async def test_only_nvdps_stale_files_are_removed(tmp_path: Path) -> None:
    keep = ["nvidia.yaml", "k8s.gpu.nvidia.com-claim_x.json", f"{PREFIX}notes.txt", "k8s.device-plugin.nvidia.com.json"]
    stale = [f"{PREFIX}gds.json", f"{PREFIX}gpu.yaml", f".{PREFIX}gpu.json.abc{writer._TMP_SUFFIX}"]
    for name in keep + stale:
        (tmp_path / name).write_text("{}")
    result = await sync_specs(tmp_path, {GPU: gpu_spec("nvidia0")}, PREFIX)
    assert sorted(result.removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, GPU])
    emptied = await sync_specs(tmp_path, {}, PREFIX)
    assert emptied.removed == (GPU,)


async def test_a_device_defined_twice_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    specs = {GPU: gpu_spec("nvidia0"), f"{PREFIX}gpu2.json": gpu_spec("nvidia0")}
    with pytest.raises(CdiError, match=r"k8s\.device-plugin\.nvidia\.com/gpu=nvidia0 would be defined in both"):
        await sync_specs(tmp_path, specs, PREFIX)
    assert os.listdir(tmp_path) == []


async def test_invalid_specs_and_foreign_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CdiError, match=r"is invalid: .*no devices"):
        await sync_specs(tmp_path, {GPU: gpu_spec()}, PREFIX)
    with pytest.raises(CdiError, match="not one of nvdp's"):
        await sync_specs(tmp_path, {"nvidia.yaml": gpu_spec("a")}, PREFIX)


async def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sync_specs(tmp_path, {GPU: gpu_spec("nvidia0")}, PREFIX)
    old = (tmp_path / GPU).read_text()

    def no_rename(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(CdiError, match=f"cannot write CDI spec {tmp_path / GPU}: No space left on device"):
        await sync_specs(tmp_path, {GPU: gpu_spec("nvidia0", "nvidia1")}, PREFIX)
    assert (tmp_path / GPU).read_text() == old
    assert os.listdir(tmp_path) == [GPU]


async def test_single_spec_write_and_remove_for_dra_claims(tmp_path: Path) -> None:
    name = "k8s.gpu.nvidia.com-claim_uid-1.json"
    spec = gpu_spec("uid-1-gpu-0", kind="k8s.gpu.nvidia.com/claim")
    assert await write_spec(tmp_path, name, spec) is True
    assert await write_spec(tmp_path, name, spec) is False
    assert await remove_spec(tmp_path, name) is True
    assert await remove_spec(tmp_path, name) is False
