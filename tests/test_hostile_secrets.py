"""Issue 14 item 8: the API token never reaches logs, errors or Events; API error bodies are bounded and redacted."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from nvdp.k8s.client import MAX_ERROR_TEXT, KubeConfigError, api_error, kubeconfig_config, open_client
from nvdp.k8s.node_labels import watch_node_label
from nvdp.k8s.watch import WatchOptions
from tests.fake_apiserver import follow, open_fake_apiserver, write_kubeconfig

SECRET = "SECRETTOKENPART"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJlc2lnbmF0dXJl"
FAST = WatchOptions(backoff_initial_s=0.02, backoff_max_s=0.05, min_stream_s=0.05)


@pytest.mark.parametrize("token", [f"abc {SECRET}", f"abc\n{SECRET}", f"abc\t{SECRET}", f"abc\r\n{SECRET}",
                                   f"abc\x00{SECRET}", f"abcé{SECRET}"])
async def test_an_inline_token_that_cannot_be_sent_is_refused_without_showing_it(tmp_path: Path, token: str) -> None:
    async with open_fake_apiserver() as fake:
        path = write_kubeconfig(tmp_path / "kubeconfig", fake, token=token)
        with pytest.raises(KubeConfigError) as caught:
            kubeconfig_config([path])
    message = str(caught.value)
    assert SECRET not in message and "abc" not in message
    assert "contains whitespace, control or non-ASCII characters" in message and str(path) in message


async def test_surrounding_whitespace_is_trimmed(tmp_path: Path) -> None:
    async with open_fake_apiserver() as fake:
        config = kubeconfig_config([write_kubeconfig(tmp_path / "kubeconfig", fake, token=" token-1\n")])
    assert config.token == "token-1"


async def test_a_token_file_with_a_line_break_is_never_logged(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The issue's leak: h11's "Illegal header value b'Bearer ...'" at every retry. Now the token is not sent (the
    API answers 401) and no log line carries it."""
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text(f"token-1\n{SECRET}\n")
    async with open_fake_apiserver() as fake:
        fake.set_node("n1", {})
        async with open_client(fake.api_config(token_file=token_file)) as client:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    async def watch() -> None:
                        async with follow(watch_node_label(client, "n1", "x", FAST)) as values:
                            await values.next()

                    nursery.start_soon(watch)
                    # Positive witness: the daemon kept trying (and logging) several times.
                    await fake.wait_requests("list", 3)
                    nursery.cancel_scope.cancel()
    text = caplog.text
    assert "not using it" in text and "cannot list" in text
    assert SECRET not in text and "Illegal header value" not in text


def test_an_error_body_that_echoes_credentials_is_redacted_and_bounded() -> None:
    body = (f"<html><pre>GET /api/v1/nodes\nAuthorization: Bearer {JWT}\nX-Token: {JWT}\n"
            f"Authorization: Basic dXNlcjpwYXNz\n</pre>" + "x" * 100_000 + "</html>").encode()
    error = api_error(502, "Bad Gateway", body)
    text = str(error)
    assert JWT not in text and "eyJ" not in text and "dXNlcjpwYXNz" not in text
    assert "Bearer <redacted>" in text
    assert len(error.message) <= MAX_ERROR_TEXT + 3


def test_a_status_message_is_bounded_and_newlines_escaped() -> None:
    body = ('{"kind":"Status","code":403,"message":"forbidden\\nFORGED LOG LINE ' + "y" * 10_000 + '"}').encode()
    error = api_error(403, "Forbidden", body)
    assert "\n" not in str(error) and "\\n" in error.message
    assert len(error.message) <= MAX_ERROR_TEXT + 3


def test_a_kubeconfig_with_a_yaml_error_on_the_token_line_does_not_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(f"apiVersion: v1\nusers:\n- name: node\n  user:\n    token: {SECRET}: [\n")
    with pytest.raises(KubeConfigError) as caught:
        kubeconfig_config([path])
    assert SECRET not in str(caught.value) and "not valid YAML" in str(caught.value)
