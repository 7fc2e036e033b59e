"""IMEX channels: settings with upstream's rules and messages (`api/config/v1/imex_test.go`, `validateFlags`), the
channel's presence as a character device (`internal/imex`), the plan's choice, and the simulated node's channel.
The CDI annotation prefix's settings are here too: the other new option of issue 16's Allocate."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nvdp import sim
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import parse_config
from nvdp.core.config.settings import Settings, resolve
from nvdp.core.inventory import NodeInventory
from nvdp.core.plan.build import PlanError, build_plan
from nvdp.core.plan.imex import select_imex_channels
from nvdp.core.plan.model import Plan, Resource
from nvdp.nvml import adapter
from nvdp.sim import SimHandle, SimNode
from tests.helpers import gpu

SOURCE = "c.yaml"
CHANNEL = "dev/nvidia-caps-imex-channels/channel0"


def settings(file: str = "", env: dict[str, str] | None = None, **cli: str) -> Settings:
    return resolve(cli, env or {}, parse_config(file, SOURCE), SOURCE)


# --- settings: upstream's TestImexUnmarshal and AssertChannelIDsValid ------------------------------------------------


@pytest.mark.parametrize(
    ("file", "ids"),
    [
        pytest.param("imex: {}\n", (), id="an empty section"),
        pytest.param("imex:\n  channelIDs: null\n", (), id="null channel IDs"),
        pytest.param("imex:\n  channelIDs: []\n", (), id="no channel"),
        pytest.param("imex:\n  channelIDs: [0]\n", (0,), id="channel 0"),
    ],
)
def test_valid_imex_sections(file: str, ids: tuple[int, ...]) -> None:
    assert settings(file).imex_channel_ids == ids


@pytest.mark.parametrize(
    ("file", "cli", "env", "message"),
    [
        pytest.param("imex:\n  channelIDs: [2]\n", {}, {},
                     "c.yaml: $.imex.channelIDs: invalid IMEX channel IDs: invalid IMEX config: channelIDs must be [] "
                     "or [0]; found [2]", id="channel 2 in the file"),
        pytest.param("", {"imex_channel_ids": "0,1"}, {},
                     "--imex-channel-ids: invalid IMEX channel IDs: invalid IMEX config: channelIDs must be [] or "
                     "[0]; found [0 1]", id="two channels on the command line, printed as Go prints them"),
        pytest.param("", {}, {"IMEX_CHANNEL_IDS": "0,0"},
                     "IMEX_CHANNEL_IDS: invalid IMEX channel IDs: invalid IMEX config: channelIDs must be [] or [0]; "
                     "found [0 0]", id="a repeated channel"),
        pytest.param("", {}, {"IMEX_CHANNEL_IDS": "zero"},
                     "IMEX_CHANNEL_IDS: invalid value 'zero': expected whole numbers", id="not a number"),
        pytest.param("", {}, {"IMEX_REQUIRED": "maybe"}, "IMEX_REQUIRED: invalid value 'maybe'", id="not a boolean"),
    ],
)
def test_invalid_imex_settings_use_upstreams_words(file: str, cli: dict[str, str], env: dict[str, str],
                                                    message: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings(file, env, **cli)
    assert str(error.value).startswith(message), str(error.value)


def test_flag_beats_env_beats_file() -> None:
    file = "imex:\n  channelIDs: [2]\n  required: false\n"
    # The file's invalid [2] is overridden, so never checked (upstream: the flag replaces the file's value).
    assert settings(file, {"IMEX_CHANNEL_IDS": "0", "IMEX_REQUIRED": "true"}).imex_channel_ids == (0,)
    assert settings(file, {"IMEX_CHANNEL_IDS": "7"}, imex_channel_ids="").imex_channel_ids == ()
    got = settings(file, {"IMEX_REQUIRED": "true"}, imex_channel_ids="0", imex_required="false")
    assert (got.imex_channel_ids, got.imex_required) == ((0,), False)


def test_defaults_request_no_channel() -> None:
    got = settings()
    assert (got.imex_channel_ids, got.imex_required, got.cdi_annotation_prefix) == ((), False, "cdi.k8s.io/")


# --- the CDI annotation prefix and the CDI strategies ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["cdi-annotations", "cdi-cri", "envvar,cdi-annotations",
                                      "volume-mounts,cdi-cri,cdi-annotations"])
def test_cdi_strategies_are_accepted_alone_or_with_others(strategy: str) -> None:
    assert settings(device_list_strategy=strategy).device_list_strategy == tuple(strategy.split(","))


def test_cdi_annotation_prefix_from_each_source() -> None:
    file = "flags:\n  plugin:\n    cdiAnnotationPrefix: file.cdi.k8s.io/\n"
    assert settings(file).cdi_annotation_prefix == "file.cdi.k8s.io/"
    assert settings(file, {"CDI_ANNOTATION_PREFIX": "env.cdi.k8s.io/"}).cdi_annotation_prefix == "env.cdi.k8s.io/"
    assert settings(file, cdi_annotation_prefix="flag/").cdi_annotation_prefix == "flag/"


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        pytest.param("", "--cdi-annotation-prefix: the CDI annotation prefix is empty", id="empty"),
        pytest.param("my prefix/", "--cdi-annotation-prefix: invalid CDI annotation prefix 'my prefix/'",
                     id="a space"),
        pytest.param("cdi\n.k8s.io/", "invalid CDI annotation prefix", id="a newline"),
        pytest.param("x" * 254, "expected at most 253 printable ASCII characters", id="too long"),
    ],
)
def test_deliberately_unlike_upstream_a_prefix_that_cannot_start_an_annotation_key_is_refused(
    prefix: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        settings(cdi_annotation_prefix=prefix)
    assert str(error.value).startswith("--cdi-annotation-prefix: ") and message in str(error.value)


# --- the plan's choice: upstream's GetChannels --------------------------------------------------------------------


def node_with(*channels: int) -> NodeInventory:
    return NodeInventory("580.82.07", 13000, (), imex_channels=channels)


def test_a_present_channel_is_selected() -> None:
    assert select_imex_channels(node_with(0), settings("imex:\n  channelIDs: [0]\n")) == (0,)


def test_no_channel_requested_none_selected_even_if_present() -> None:
    assert select_imex_channels(node_with(0), settings()) == ()


def test_a_missing_channel_is_skipped_with_upstreams_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nvdp.core.plan.imex")
    optional = settings("imex:\n  channelIDs: [0]\n", {"NVIDIA_DEV_ROOT": "/run/nvidia/driver"})
    build_plan(node_with(), optional)  # not refused
    assert select_imex_channels(node_with(), optional) == ()
    (record,) = caplog.records
    assert record.getMessage().startswith("Ignoring requested IMEX channel channel0 (no character device "
                                          "/dev/nvidia-caps-imex-channels/channel0 under the dev root "
                                          "/run/nvidia/driver)")


def test_a_missing_required_channel_refuses_the_plan_with_upstreams_message() -> None:
    with pytest.raises(PlanError) as error:
        build_plan(node_with(), settings("imex:\n  channelIDs: [0]\n  required: true\n"))
    assert str(error.value).startswith("requested IMEX channel channel0 does not exist")
    assert "--imex-required" in str(error.value)


def test_a_present_required_channel_builds_the_plan() -> None:
    required = settings("imex:\n  channelIDs: [0]\n  required: true\n")
    assert build_plan(node_with(0), required).resources == ()
    assert select_imex_channels(node_with(0), required) == (0,)


def test_required_without_channels_requires_nothing() -> None:
    assert select_imex_channels(node_with(), settings("imex:\n  required: true\n")) == ()
    build_plan(node_with(), settings("imex:\n  required: true\n"))


# --- presence: a character device under the dev root or at the plain path ---------------------------------------


def test_a_character_device_counts(tmp_path: Path) -> None:
    (tmp_path / CHANNEL).parent.mkdir(parents=True)
    (tmp_path / CHANNEL).symlink_to("/dev/null")
    assert adapter.find_imex_channels((tmp_path,)) == (0,)


def test_a_regular_file_or_nothing_does_not(tmp_path: Path) -> None:
    assert adapter.find_imex_channels((tmp_path,)) == ()
    (tmp_path / CHANNEL).parent.mkdir(parents=True)
    (tmp_path / CHANNEL).touch()
    assert adapter.find_imex_channels((tmp_path,)) == ()


def test_the_dev_root_or_the_plain_path_each_suffice(tmp_path: Path) -> None:
    dev_root, plain = tmp_path / "driver", tmp_path / "host"
    (plain / CHANNEL).parent.mkdir(parents=True)
    (plain / CHANNEL).symlink_to("/dev/null")
    (dev_root / CHANNEL).parent.mkdir(parents=True)
    (dev_root / CHANNEL).touch()
    assert adapter.find_imex_channels((dev_root, plain)) == (0,)
    assert adapter.find_imex_channels((dev_root,)) == ()


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_real_character_node_counts(tmp_path: Path) -> None:
    (tmp_path / CHANNEL).parent.mkdir(parents=True)
    os.mknod(tmp_path / CHANNEL, 0o600 | 0o020000, os.makedev(1, 3))
    assert adapter.find_imex_channels((tmp_path,)) == (0,)


# --- the simulated node declares its channel --------------------------------------------------------------------


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[SimNode], SimHandle]]:
    def _start(node: SimNode) -> SimHandle:
        adapter.shutdown()
        handle = sim.activate(node, tmp_path / "work")
        adapter.init()
        return handle

    yield _start
    adapter.shutdown()


@pytest.mark.parametrize(("channels", "found"), [([0], (0,)), ([], ())])
def test_the_simulated_node_has_the_channels_it_declares(
    start: Callable[[SimNode], SimHandle], channels: list[int], found: tuple[int, ...]
) -> None:
    import yaml

    node = sim.parse_node(yaml.safe_dump({"driverVersion": "580.82.07", "cudaDriverVersion": 13000,
                                          "gpus": [gpu(0)], "imexChannels": channels}), "node.yaml")
    handle = start(node)
    assert adapter.read_inventory(handle.host_root, handle.host_root).imex_channels == found


def test_a_simulated_channel_number_is_checked() -> None:
    with pytest.raises(sim.SimNodeError, match=r"node\.yaml: \$\.imexChannels\[0\]: must be a channel number"):
        sim.parse_node("driverVersion: '1'\ncudaDriverVersion: 1\nimexChannels: [-1]\n", "node.yaml")


def test_tegra_discovery_is_still_refused_naming_the_value() -> None:
    with pytest.raises(ConfigError, match=r"^DEVICE_DISCOVERY_STRATEGY: invalid value 'tegra': accepted values are "
                                          r"auto, nvml"):
        settings(env={"DEVICE_DISCOVERY_STRATEGY": "tegra"})


def test_the_readme_flags_table_lists_the_cdi_and_imex_options() -> None:
    from nvdp.core.config.settings import OPTIONS_BY_DEST

    rows = [line for line in (Path(__file__).resolve().parent.parent / "README.md").read_text().splitlines()
            if line.startswith("| `--")]
    for dest in ("cdi_annotation_prefix", "imex_channel_ids", "imex_required"):
        option = OPTIONS_BY_DEST[dest]
        (row,) = [r for r in rows if f"`{option.flags[0]}`" in r]
        assert f"`{option.envs[0]}`" in row, row
    (row,) = [r for r in rows if "`--device-list-strategy`" in r]
    assert all(f"`{s}`" in row for s in ("cdi-annotations", "cdi-cri")), row
    assert f"`{OPTIONS_BY_DEST['cdi_annotation_prefix'].default}`" in next(r for r in rows if "prefix" in r)


@pytest.mark.parametrize(("channels", "code", "says"), [
    ([0], 0, "IMEX channels given to every container: 0"),
    ([], 1, "requested IMEX channel channel0 does not exist"),
])
def test_config_validate_checks_a_required_channel_on_the_simulated_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, channels: list[int],
    code: int, says: str
) -> None:
    from nvdp.cli import main
    from tests.helpers import write_node

    monkeypatch.setenv(sim.STATE_ENV, os.environ.get(sim.STATE_ENV, ""))
    node = write_node(tmp_path / "node.yaml", [gpu(0)], imexChannels=channels)
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nimex:\n  channelIDs: [0]\n  required: true\n")
    assert main(["config", "validate", str(config), "--simulate", str(node)]) == code
    assert says in capsys.readouterr().out


def test_each_resource_server_gets_the_cdi_prefix_and_the_present_channels() -> None:
    from nvdp.controller import serving_contexts
    from tests.test_allocate import gpu as device

    chosen = settings("imex:\n  channelIDs: [0]\n", {"DEVICE_LIST_STRATEGY": "envvar,cdi-annotations",
                                                      "CDI_ANNOTATION_PREFIX": "custom.cdi.k8s.io/"})
    plan = Plan((Resource("nvidia.com/gpu", (device("GPU-a", 0),)),))
    (present,) = serving_contexts(plan, node_with(0), chosen)
    assert (present.options.device_list_strategy, present.options.cdi_annotation_prefix,
            present.options.imex_channels) == (("envvar", "cdi-annotations"), "custom.cdi.k8s.io/", (0,))
    (absent,) = serving_contexts(plan, node_with(), chosen)
    assert absent.options.imex_channels == ()
