"""Reading one ResourceClaim (`resource.k8s.io/v1`), as the DRA plugin does at every Prepare.

RBAC: `get` on `resourceclaims` (docs/security.md). The claim is read whole and decoded as plain JSON: what nvdp
needs of it is picked out by `nvdp.core.dra.claims`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import msgspec

from nvdp.k8s.client import ApiClient, ApiError

RESOURCE_API = "/apis/resource.k8s.io/v1"
#: A claim's JSON is a few KiB (at most 32 results, 32 configs of 10 KiB each); more is not a claim.
MAX_CLAIM_BYTES = 1 << 20


class ClaimReadError(Exception):
    """The claim's answer cannot be used (too large, not JSON, not an object)."""


async def get_claim(client: ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    """The claim, or None when it does not exist. `ApiError` / `ApiUnreachable` for the rest, `ClaimReadError` for
    an answer that is no claim."""
    path = f"{RESOURCE_API}/namespaces/{quote(namespace, safe='')}/resourceclaims/{quote(name, safe='')}"
    try:
        body = await client.get_json(path)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    if len(body) > MAX_CLAIM_BYTES:
        raise ClaimReadError(f"the API server's answer for claim {namespace}/{name} is {len(body)} bytes "
                             f"(at most {MAX_CLAIM_BYTES} are read)")
    try:
        claim = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ClaimReadError(f"the API server's answer for claim {namespace}/{name} is not JSON: {exc}") from None
    if not isinstance(claim, dict):
        raise ClaimReadError(f"the API server's answer for claim {namespace}/{name} is not an object")
    return claim
