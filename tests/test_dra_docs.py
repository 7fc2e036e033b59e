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
