"""docs/security.md's DRA budgets are the code's."""

from __future__ import annotations

from nvdp.core.dra import plugin
from tests.helpers import ROOT


def test_the_dra_budgets_in_security_md_are_the_constants() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    section = text[text.index("## The DRA kubelet plugin: sockets and budgets"):]
    assert f"| {plugin.MAX_CLAIMS_PER_CALL} (`MAX_CLAIMS_PER_CALL`" in section
    assert f"| {plugin.MAX_PENDING_CALLS} (`MAX_PENDING_CALLS`)" in section
    assert f"| {plugin.CALL_DEADLINE_S:g} s (`CALL_DEADLINE_S`)" in section
    assert f"did not finish within {plugin.CALL_DEADLINE_S:g} s" in section
    assert f"at least every {plugin.HEALTH_RESEND_S:g} s (`HEALTH_RESEND_S`)" in section
    assert f"cut to {plugin.MAX_HEALTH_MESSAGE} characters" in section
    assert plugin.CALL_DEADLINE_S < 45
    assert f"cut to {plugin.MAX_CLAIM_ERROR} characters\n(`MAX_CLAIM_ERROR`)" in section


def test_dra_md_says_what_the_code_does() -> None:
    from nvdp.core.config.settings import OPTIONS_BY_DEST

    text = " ".join((ROOT / "docs" / "dra.md").read_text().split())  # line breaks do not matter
    for dest in ("dra_enabled", "dra_driver_name", "kubelet_registry_dir", "kubelet_plugins_dir"):
        option = OPTIONS_BY_DEST[dest]
        default = str(option.default).lower() if isinstance(option.default, bool) else option.default
        assert f"| `{option.flags[0]}` | `{option.envs[0]}` |" in text and f"`{default}` |" in text, dest
    assert ", ".join(f"`{v}`" for v in plugin.SUPPORTED_VERSIONS) in text
    assert f"within {plugin.CALL_DEADLINE_S:g} s" in text
    assert f"at least every {plugin.HEALTH_RESEND_S:g} s" in text
    assert "which API serves each GPU (DRA driver gpu.nvidia.com):" in text  # tests/test_dra_settings.py prints it
    assert "`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=<MiB>M`" in text  # tests/test_dra_daemon.py checks the spec
