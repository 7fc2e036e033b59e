"""Registering a resource with the kubelet (`v1beta1.Registration/Register` on `kubelet.sock`).

Runs on the asyncio loop. The kubelet dials our socket back and calls `GetDevicePluginOptions` before it answers,
so the resource's server must already be serving when this is called.
"""

from __future__ import annotations

from pathlib import Path

from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from nvdp.kubelet.api import v1beta1 as api
from nvdp.kubelet.plugin_server import OPTIONS

API_VERSION = "v1beta1"
#: The kubelet allows itself 10 s to dial back; leave room for that plus the call itself.
REGISTER_TIMEOUT_S = 15.0


#: The most of a kubelet's error text that goes into a RegistrationError (and so into the log).
MAX_REASON_CHARS = 200


def _reason(text: str) -> str:
    """The kubelet's (or a pretender's) error text cut short and escaped: it must not forge log lines."""
    cut = text[:MAX_REASON_CHARS]
    shown = cut if cut.isprintable() and cut.isascii() else cut.encode("unicode_escape").decode("ascii")
    return shown + (f"... ({len(text)} characters)" if len(text) > MAX_REASON_CHARS else "")


class RegistrationError(Exception):
    """The kubelet refused or could not be reached; retry later (or when kubelet.sock is re-created)."""


async def register(kubelet_socket: Path, endpoint: str, resource_name: str) -> None:
    request = api.RegisterRequest(
        version=API_VERSION, endpoint=endpoint, resource_name=resource_name, options=OPTIONS)
    channel = Channel(path=str(kubelet_socket))
    try:
        await api.RegistrationStub(channel).register(request, timeout=REGISTER_TIMEOUT_S)
    except GRPCError as exc:
        raise RegistrationError(f"kubelet refused {resource_name}: {_reason(exc.message or exc.status.name)}") from None
    except (OSError, StreamTerminatedError, TimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
        raise RegistrationError(f"cannot reach the kubelet at {kubelet_socket}: {_reason(reason)}") from None
    except Exception as exc:
        # Anything else is grpclib or h2 tripping over a peer that misbehaved (a socket that accepts and closes at
        # once, a restart mid-call: grpclib then raises AttributeError from a closed connection). The kubelet is
        # in an unknown state, which is exactly what a retry is for.
        raise RegistrationError(
            f"registration with the kubelet at {kubelet_socket} broke off ({type(exc).__name__}: {_reason(str(exc))})"
        ) from exc
    finally:
        channel.close()
