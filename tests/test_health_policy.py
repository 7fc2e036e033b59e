"""The XID policy from DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS: upstream's health_test.go cases, translated,
plus nvdp's one deliberate difference."""

from __future__ import annotations

import pytest

from nvdp.core.health.xids import DEFAULT_IGNORED, EVENT_DOUBLE_BIT_ECC, EVENT_XID_CRITICAL, XidPolicy, xid_name
from nvdp.nvml import adapter

UPSTREAM_DEFAULTS = {13, 31, 43, 45, 68, 109}


def test_the_event_bits_match_nvml() -> None:
    assert (EVENT_XID_CRITICAL, EVENT_DOUBLE_BIT_ECC) == (adapter.EVENT_XID_CRITICAL, adapter.EVENT_DOUBLE_BIT_ECC)


@pytest.mark.parametrize(
    ("raw", "xids", "bad"),
    [
        pytest.param("", set(), [], id="empty"),
        pytest.param(None, set(), [], id="unset"),
        pytest.param(",", set(), [], id="only-a-comma"),
        pytest.param("not-an-int", set(), ["not-an-int"], id="not-an-int-is-reported"),
        pytest.param("68", {68}, [], id="one"),
        pytest.param("-68", set(), ["-68"], id="negative-is-reported"),
        pytest.param("68  ", {68}, [], id="trailing-blanks"),
        pytest.param("68,", {68}, [], id="trailing-comma"),
        pytest.param(",68", {68}, [], id="leading-comma"),
        pytest.param("68,67", {67, 68}, [], id="two"),
        pytest.param("68,not-an-int,67", {67, 68}, ["not-an-int"], id="malformed-in-the-middle"),
        pytest.param(" 48 , 94 ", {48, 94}, [], id="blanks-around-entries"),
        pytest.param("0", set(), ["0"], id="zero-is-not-an-xid"),
        pytest.param("0x30", set(), ["0x30"], id="hex-is-not-accepted"),
    ],
)
def test_disable_lists_parse_like_upstream(raw: str | None, xids: set[int], bad: list[str]) -> None:
    policy = XidPolicy.from_env(raw, None)
    assert policy.disabled == frozenset(xids) | DEFAULT_IGNORED
    assert not policy.disable_all
    assert len(policy.warnings) == len(bad)
    for warning, entry in zip(policy.warnings, bad, strict=True):
        assert "DP_DISABLE_HEALTHCHECKS" in warning and repr(entry) in warning


def test_malformed_enable_entries_name_their_variable() -> None:
    policy = XidPolicy.from_env(None, "48,x")
    assert policy.enabled == {48}
    assert policy.warnings == (
        "DP_ENABLE_HEALTHCHECKS: ignoring 'x': not an XID (a positive integer), 'all' or 'xids'",
    )


def test_defaults_ignore_the_application_xids_and_nothing_else() -> None:
    policy = XidPolicy.from_env(None, None)
    assert policy == XidPolicy()
    assert DEFAULT_IGNORED == UPSTREAM_DEFAULTS
    assert not policy.checks_disabled
    assert [x for x in (13, 31, 43, 45, 68, 109) if policy.is_critical(x)] == []
    assert all(policy.is_critical(x) for x in (48, 63, 64, 74, 79, 92, 94, 95, 555))
    assert policy.ecc_critical
    assert policy.describe() == (
        "health checks on: every XID and double-bit ECC errors are critical except 13, 31, 43, 45, 68, 109"
    )


@pytest.mark.parametrize("value", ["all", "xids", "ALL", " xids ", "48,all"])
def test_disable_all_or_xids_disables_everything(value: str) -> None:
    policy = XidPolicy.from_env(value, None)
    assert policy.disable_all and policy.checks_disabled
    assert not any(policy.is_critical(x) for x in (13, 48, 79, 555))
    assert not policy.ecc_critical
    assert policy.describe() == "health checks off: no XID is critical (DP_DISABLE_HEALTHCHECKS=all)"


def test_enable_all_makes_every_xid_critical_even_the_default_ignored() -> None:
    policy = XidPolicy.from_env(None, "all")
    assert all(policy.is_critical(x) for x in (13, 31, 43, 45, 68, 109, 555))
    assert not policy.checks_disabled and policy.ecc_critical
    assert "DP_ENABLE_HEALTHCHECKS=all" in policy.describe()


def test_enable_all_wins_over_disable_all() -> None:
    policy = XidPolicy.from_env("all", "all")
    assert not policy.checks_disabled
    assert policy.is_critical(13) and policy.is_critical(48)


def test_an_xid_both_disabled_and_enabled_is_critical() -> None:
    policy = XidPolicy.from_env("11", "11")
    assert policy.is_critical(11)
    assert not any(policy.is_critical(x) for x in UPSTREAM_DEFAULTS)
    assert policy.is_critical(555)


def test_enable_can_re_enable_a_default_ignored_xid() -> None:
    policy = XidPolicy.from_env(None, "13")
    assert policy.is_critical(13) and not policy.is_critical(31)
    assert policy.describe().endswith("except 31, 43, 45, 68, 109")


def test_disable_list_adds_to_the_defaults() -> None:
    policy = XidPolicy.from_env("48,94", None)
    assert not policy.is_critical(48) and not policy.is_critical(94) and not policy.is_critical(13)
    assert policy.is_critical(79)


def test_nvdp_difference_enable_list_still_works_when_disable_is_all() -> None:
    # Upstream returns before looking at ENABLE when DISABLE is all; nvdp reads this as an allow-list.
    policy = XidPolicy.from_env("all", "48,79")
    assert not policy.checks_disabled
    assert policy.is_critical(48) and policy.is_critical(79)
    assert not policy.is_critical(13) and not policy.is_critical(94)
    assert not policy.ecc_critical  # the allow-list names XIDs; ECC events are not among them
    assert policy.describe() == (
        "health checks on for XIDs 48, 79 only (DP_DISABLE_HEALTHCHECKS=all with DP_ENABLE_HEALTHCHECKS)"
    )


def test_xid_names_show_in_log_text() -> None:
    assert xid_name(48) == "XID 48 (double-bit ECC error)"
    assert xid_name(79) == "XID 79 (GPU has fallen off the bus)"
    assert xid_name(4242) == "XID 4242"
