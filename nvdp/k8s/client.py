"""Access to the Kubernetes API server: where it is, how to trust it, how to authenticate.

Two ways to find the server, as client-go does:

- in-cluster: `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` and the pod's service-account directory (token, CA).
  The kubelet rotates the projected token (it expires after an hour or so): the file is re-read whenever it changes
  and once more after a 401, so a long-running watch never ends up with a stale token;
- a kubeconfig (`--kubeconfig`/`KUBECONFIG`, for systemd hosts): server, CA (file or data), client certificate and key
  (file or data), bearer token (inline or `tokenFile`), `insecure-skip-tls-verify`, chosen by `current-context`.

Environment and paths are arguments: the CLI is the only reader of `os.environ`. The HTTP client is httpx on trio
(anyio picks trio up by itself), one connection pool for the daemon's life.
"""

from __future__ import annotations

import base64
import contextlib
import http
import logging
import os
import re
import ssl
import tempfile
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import yaml

from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import read_config_bytes, yaml_problem

log = logging.getLogger(__name__)

#: Where the kubelet mounts a pod's service-account token, CA and namespace.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


#: Longest text from the API server (a Status message, an error body) that goes into an error, a log line or an
#: Event: enough for any real Status message.
MAX_ERROR_TEXT = 300

#: What a token must look like to go into an Authorization header: visible ASCII, no whitespace (RFC 6750's
#: b64token is narrower; this is what h11 and the API server accept). Checked before use, so that a token with a
#: newline never reaches h11, whose "Illegal header value" error would quote it.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
#: Credentials a server or proxy may echo back in an error body; each replaced before the text is kept.
_CREDENTIALS = (
    re.compile(r"(?i)\b(bearer|basic)(\s+|%20|\\x20)[^\s'\"<>,;]+"),
    # A JWT (service-account tokens are JWTs) anywhere, quoted or not.
    re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Text for a log line, an error or an Event: the given secrets and anything that looks like a credential
    replaced by `<redacted>`, control characters escaped, and at most `MAX_ERROR_TEXT` characters."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    text = _CREDENTIALS[0].sub(lambda m: f"{m.group(1)} <redacted>", text)
    text = _CREDENTIALS[1].sub("<redacted>", text)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."


def check_token(token: str, where: str) -> str:
    """The token without surrounding whitespace, or KubeConfigError (which never contains the token) if what is
    left cannot be sent in a header."""
    stripped = token.strip()
    if not _TOKEN.match(stripped):
        raise KubeConfigError(
            f"{where}: the bearer token ({len(stripped)} characters, not shown) contains whitespace, control or "
            "non-ASCII characters and cannot be sent; check it for a line break or a pasted space")
    return stripped


class KubeConfigError(ConfigError):
    """The API server cannot be reached as configured: a user error that retrying will not fix."""


class ApiError(Exception):
    """The API server answered with an error status (a `Status` object when it says more)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}" if message else f"HTTP {status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message


class ApiUnreachable(Exception):
    """The API server could not be asked (connection, TLS, timeout, protocol): httpx's and the OS's errors, as they
    leave `nvdp.k8s`. The text is bounded and redacted (a transport error may quote a header it choked on)."""

    @classmethod
    def of(cls, exc: BaseException) -> ApiUnreachable:
        if isinstance(exc, httpx.TimeoutException):
            return cls(f"no answer in time ({type(exc).__name__})")
        return cls(f"{type(exc).__name__}: {redact(str(exc))}" if str(exc) else type(exc).__name__)


class Status(msgspec.Struct, kw_only=True):
    """The API's error object (also the `object` of a watch ERROR event). Only the fields nvdp reads."""

    code: int = 0
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Everything needed to talk to one API server."""

    #: `https://host:port`, without a trailing slash.
    server: str
    #: Human description for logs: "in-cluster service account" or "kubeconfig PATH, context NAME".
    source: str
    ca_file: Path | None = None
    ca_data: bytes | None = None
    insecure_skip_tls_verify: bool = False
    token: str | None = None
    #: Re-read when it changes (in-cluster token rotation, kubeconfig `tokenFile`).
    token_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    client_cert_data: bytes | None = None
    client_key_data: bytes | None = None


def in_cluster_config(env: Mapping[str, str], service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> ApiConfig:
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "") or "443"
    if not host:
        raise KubeConfigError(
            "not running in a pod (KUBERNETES_SERVICE_HOST is unset): give a kubeconfig with --kubeconfig or "
            "KUBECONFIG")
    token_file = service_account_dir / "token"
    if not token_file.is_file():
        raise KubeConfigError(
            f"{token_file}: no service-account token; set automountServiceAccountToken (or give a kubeconfig)")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 service address
    ca_file = service_account_dir / "ca.crt"
    return ApiConfig(
        server=f"https://{host}:{port}",
        source="in-cluster service account",
        ca_file=ca_file if ca_file.is_file() else None,
        token_file=token_file,
    )


def kubeconfig_config(paths: Sequence[Path], context: str | None = None) -> ApiConfig:
    """Read a kubeconfig (several files merge as kubectl merges them: the first definition of a name wins)."""
    clusters: dict[str, tuple[dict[str, Any], Path]] = {}
    users: dict[str, tuple[dict[str, Any], Path]] = {}
    contexts: dict[str, dict[str, Any]] = {}
    current = context or ""
    read_any = False
    for path in paths:
        if not path.exists():
            continue
        try:
            # Bounded and non-blocking (no FIFO, at most 1 MiB), as a config file.
            document = yaml.safe_load(read_config_bytes(path))
        except ConfigError as exc:
            raise KubeConfigError(str(exc).replace("config file", "kubeconfig")) from None
        except yaml.YAMLError as exc:
            # Without the source line PyYAML would quote: it may be the one with the token.
            raise KubeConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
        read_any = True
        if document is None:
            continue
        if not isinstance(document, dict):
            raise KubeConfigError(f"{path}: expected a kubeconfig mapping")
        base = path.parent
        for entry in document.get("clusters") or ():
            clusters.setdefault(str(entry.get("name", "")), (entry.get("cluster") or {}, base))
        for entry in document.get("users") or ():
            users.setdefault(str(entry.get("name", "")), (entry.get("user") or {}, base))
        for entry in document.get("contexts") or ():
            contexts.setdefault(str(entry.get("name", "")), entry.get("context") or {})
        current = current or str(document.get("current-context") or "")
    where = ":".join(str(p) for p in paths)
    if not read_any:
        raise KubeConfigError(f"{where}: kubeconfig not found")
    if not current:
        raise KubeConfigError(f"{where}: kubeconfig has no current-context")
    if current not in contexts:
        raise KubeConfigError(f"{where}: context {current!r} not found in the kubeconfig")
    ctx = contexts[current]
    cluster_name, user_name = str(ctx.get("cluster", "")), str(ctx.get("user", ""))
    if cluster_name not in clusters:
        raise KubeConfigError(f"{where}: context {current!r} names cluster {cluster_name!r}, which is not defined")
    cluster, cluster_base = clusters[cluster_name]
    user, user_base = users.get(user_name, ({}, Path(".")))
    if user_name and user_name not in users:
        raise KubeConfigError(f"{where}: context {current!r} names user {user_name!r}, which is not defined")
    for unsupported in ("exec", "auth-provider", "username"):
        if unsupported in user:
            raise KubeConfigError(
                f"{where}: user {user_name!r}: {unsupported} authentication is not supported by nvdp; use a "
                "bearer token (token or tokenFile) or a client certificate")
    server = str(cluster.get("server") or "").rstrip("/")
    if not server:
        raise KubeConfigError(f"{where}: cluster {cluster_name!r} has no server")

    def file(entry: Mapping[str, Any], key: str, base: Path) -> Path | None:
        # kubectl resolves relative paths against the directory of the file that defines them.
        value = entry.get(key)
        return (base / value) if value else None

    def data(entry: Mapping[str, Any], key: str) -> bytes | None:
        value = entry.get(key)
        if not value:
            return None
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise KubeConfigError(f"{where}: {key} is not valid base64") from None

    return ApiConfig(
        server=server,
        source=f"kubeconfig {where}, context {current}",
        ca_file=file(cluster, "certificate-authority", cluster_base),
        ca_data=data(cluster, "certificate-authority-data"),
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify", False)),
        token=check_token(str(user["token"]), f"{where}: user {user_name!r}") if user.get("token") else None,
        token_file=file(user, "tokenFile", user_base),
        client_cert_file=file(user, "client-certificate", user_base),
        client_key_file=file(user, "client-key", user_base),
        client_cert_data=data(user, "client-certificate-data"),
        client_key_data=data(user, "client-key-data"),
    )


def load_api_config(
    env: Mapping[str, str],
    kubeconfig: str | None = None,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> ApiConfig:
    """`--kubeconfig` (else `KUBECONFIG`, a colon-separated list) wins; else the in-cluster service account."""
    given = kubeconfig or env.get("KUBECONFIG", "")
    if given:
        return kubeconfig_config([Path(p) for p in given.split(os.pathsep) if p])
    return in_cluster_config(env, service_account_dir)


def ssl_context(config: ApiConfig) -> ssl.SSLContext:
    try:
        if config.insecure_skip_tls_verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif config.ca_file is not None or config.ca_data is not None:
            context = ssl.create_default_context(
                cafile=str(config.ca_file) if config.ca_file else None,
                cadata=config.ca_data.decode() if config.ca_data else None)
        else:
            context = ssl.create_default_context()
        with _client_cert_files(config) as pair:
            if pair is not None:
                context.load_cert_chain(str(pair[0]), str(pair[1]))
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise KubeConfigError(f"{config.source}: cannot set up TLS: {exc}") from None
    return context


@contextlib.contextmanager
def _client_cert_files(config: ApiConfig) -> Generator[tuple[Path, Path] | None, None, None]:
    """`load_cert_chain` wants files: inline certificate data lives in a private temporary directory just long
    enough to be loaded."""
    cert_file, key_file = config.client_cert_file, config.client_key_file
    if config.client_cert_data is None and config.client_key_data is None:
        yield (cert_file, key_file or cert_file) if cert_file else None
        return
    with tempfile.TemporaryDirectory(prefix="nvdp-kube-") as tmp:
        if config.client_cert_data is not None:
            cert_file = Path(tmp) / "client.crt"
            cert_file.write_bytes(config.client_cert_data)
        if config.client_key_data is not None:
            key_file = Path(tmp) / "client.key"
            key_file.write_bytes(config.client_key_data)
        if cert_file is None or key_file is None:
            raise KubeConfigError(f"{config.source}: a client certificate needs both the certificate and its key")
        yield cert_file, key_file


class _BearerAuth(httpx.Auth):
    """A bearer token, fixed or read from a file that may be replaced at any time.

    The file is stat'ed before each request (requests are rare: one list or watch at a time) and re-read when it
    changed; a 401 forces one re-read and one retry, which covers a rotation that kept the same size and mtime.
    """

    def __init__(self, token: str | None, token_file: Path | None) -> None:
        self._token = token
        self._token_file = token_file
        self._signature: tuple[int, int, int] | None = None

    def _read(self, force: bool = False) -> str | None:
        if self._token_file is None:
            return self._token
        try:
            st = self._token_file.stat()
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            if force or signature != self._signature:
                self._signature = signature
                text = self._token_file.read_text(errors="replace")
                try:
                    self._token = check_token(text, str(self._token_file))
                except KubeConfigError as exc:
                    # Sending it would fail in h11 with the token in the error; without it, the API says 401.
                    log.warning("%s; not using it", exc)
                    self._token = None
        except OSError as exc:
            log.warning("cannot read the API token from %s: %s", self._token_file, exc.strerror or exc)
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._read()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401 and self._token_file is not None:
            fresh = self._read(force=True)
            if fresh and fresh != token:
                request.headers["Authorization"] = f"Bearer {fresh}"
                yield request


class ApiClient:
    """A thin wrapper over one `httpx.AsyncClient` aimed at one API server."""

    def __init__(self, http: httpx.AsyncClient, config: ApiConfig) -> None:
        self.http = http
        self.config = config

    @property
    def server(self) -> str:
        return self.config.server

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> bytes:
        """GET and return the body; raise `ApiError` on an error status, `ApiUnreachable` on transport trouble."""
        try:
            response = await self.http.get(path, params=params)
        except (httpx.HTTPError, OSError) as exc:
            raise ApiUnreachable.of(exc) from exc
        if response.status_code != 200:
            raise api_error(response.status_code, response.reason_phrase, response.content)
        return response.content

    async def post(self, path: str, body: Mapping[str, Any]) -> bytes:
        """POST a JSON object (e.g. an Event); raise `ApiError` on an error status, `ApiUnreachable` on transport
        trouble."""
        return await self._send("POST", path, body, "application/json")

    async def put(self, path: str, body: Mapping[str, Any]) -> bytes:
        """PUT (replace) an object; its `metadata.resourceVersion`, when set, makes the write conditional (409 on a
        conflict)."""
        return await self._send("PUT", path, body, "application/json")

    async def patch(self, path: str, body: Mapping[str, Any], *, merge: bool = True) -> bytes:
        """PATCH an object: a JSON merge patch (RFC 7386) by default, else a strategic merge patch."""
        kind = "application/merge-patch+json" if merge else "application/strategic-merge-patch+json"
        return await self._send("PATCH", path, body, kind)

    async def delete(self, path: str) -> bytes:
        """DELETE an object; a 404 is the caller's to judge (`ApiError.status`)."""
        return await self._send("DELETE", path, None, None)

    async def _send(self, method: str, path: str, body: Mapping[str, Any] | None, content_type: str | None) -> bytes:
        headers = {"Content-Type": content_type} if content_type else None
        content = msgspec.json.encode(body) if body is not None else None
        try:
            response = await self.http.request(method, path, content=content, headers=headers)
        except (httpx.HTTPError, OSError) as exc:
            raise ApiUnreachable.of(exc) from exc
        if response.status_code not in (200, 201, 202):
            raise api_error(response.status_code, response.reason_phrase, response.content)
        return response.content

    def stream(
        self, path: str, params: Mapping[str, str], read_timeout: float | None
    ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        """A streaming GET (a watch). `read_timeout` bounds each wait for bytes: a watch that goes silent for
        longer than that has stalled (a half-open TCP connection) and raises `httpx.ReadTimeout`."""
        timeout = httpx.Timeout(self.http.timeout.connect, read=read_timeout, write=10.0, pool=10.0)
        return self.http.stream("GET", path, params=params, timeout=timeout)


def api_error(status: int, reason: str, body: bytes) -> ApiError:
    if not reason:
        # HTTP/1.1 servers may omit the reason phrase (and HTTP/2 has none).
        with contextlib.suppress(ValueError):
            reason = http.HTTPStatus(status).phrase
    message = ""
    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
        message = msgspec.json.decode(body, type=Status).message
    if not message and body:
        # Not a Status: a proxy's or load balancer's page, which may echo the request's headers. Bounded and
        # redacted like any text from the server.
        message = body[: 4 * MAX_ERROR_TEXT].decode(errors="replace").strip()
    return ApiError(status, redact(reason)[:80], redact(message))


@contextlib.asynccontextmanager
async def open_client(config: ApiConfig, *, connect_timeout_s: float = 10.0) -> AsyncIterator[ApiClient]:
    """An API client for the block's duration. TLS material is loaded once, here; the token is re-read as it
    rotates."""
    verify: ssl.SSLContext | bool = ssl_context(config) if config.server.startswith("https:") else False
    auth = _BearerAuth(config.token, config.token_file) if (config.token or config.token_file) else None
    async with httpx.AsyncClient(
        base_url=config.server,
        verify=verify,
        auth=auth,
        timeout=httpx.Timeout(30.0, connect=connect_timeout_s),
        headers={"Accept": "application/json", "User-Agent": "nvdp"},
        # The API server is reached directly; a proxy from the environment is not the cluster's business.
        trust_env=False,
    ) as http:
        yield ApiClient(http, config)
