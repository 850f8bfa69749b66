"""Who may reach the server and what they may do: TLS on the gRPC port (certificates re-read when
their files change or on SIGHUP, through gRPC's dynamic server credentials), mutual TLS, bearer
tokens with roles, model control, and the refusal to listen beyond loopback unprotected.

Roles: ``infer`` may call everything but the repository's load and unload; ``admin`` may call
everything. The gRPC health service is open to all (orchestrators probe it without a token).
Tokens are compared as sha256 digests in constant time, against every known token, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from specserve.runtime.errors import SpecserveError

log = logging.getLogger(__name__)

ROLES = ("infer", "admin")
"""Token roles, weakest first."""
HEALTH_PREFIX = "/grpc.health.v1.Health/"
ADMIN_METHODS = frozenset({
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
})
"""Methods that change what is served: ``admin`` only (and off unless model control is explicit)."""
MODEL_CONTROL = ("none", "explicit")
"""Triton's model-control modes that apply here: ``none`` (the default) refuses repository load and
unload requests (UNAVAILABLE); ``explicit`` allows them (to ``admin`` tokens when tokens are on).
The repository folder is watched for changes in both."""


class SecurityError(SpecserveError):
    """A security setting that cannot be used (unreadable certificate, malformed token file,
    an unprotected server on a non-loopback address)."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise SecurityError(f"the {what} {path} is empty")
    return data


# ------------------------------------------------------------------ TLS


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None
    """Given: clients must present a certificate signed by this CA (mutual TLS)."""


class CertificateWatch:
    """Server credentials whose certificate, key and client CA are re-read without a restart:
    gRPC asks :meth:`fetch` at every new handshake, which reads the files again when their
    modification times changed or after :meth:`reload` (SIGHUP). A rotation that cannot be read
    (half-written files, a key that does not match) is logged and the previous one stays."""

    def __init__(self, files: TLSFiles):
        self.files = files
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._forced = False
        self.initial = self._configuration()
        self.rotations = 0

    def _paths(self) -> list[Path]:
        return [p for p in (self.files.cert, self.files.key, self.files.client_ca) if p is not None]

    def _stamps(self) -> tuple:
        try:
            return tuple(os.stat(p).st_mtime_ns for p in self._paths())
        except OSError:
            return ()

    def _configuration(self):
        cert = _read(self.files.cert, "TLS certificate")
        key = _read(self.files.key, "TLS key")
        ca = _read(self.files.client_ca, "client CA") if self.files.client_ca else None
        _check_pair(cert, key, self.files)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def reload(self) -> None:
        """Read the files again at the next handshake, changed or not (SIGHUP)."""
        with self._lock:
            self._forced = True

    def fetch(self):
        """gRPC's certificate fetcher: a new configuration, or None to keep the current one."""
        with self._lock:
            stamp = self._stamps()
            if not self._forced and stamp == self._stamp:
                return None
            self._forced = False
            self._stamp = stamp
            try:
                configuration = self._configuration()
            except SecurityError as exc:
                log.error("TLS certificates not rotated, the previous ones stay: %s", exc)
                return None
            self.rotations += 1
            log.info("TLS certificates re-read from %s", self.files.cert)
            return configuration

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch,
                                                   require_client_authentication=self.files.client_ca is not None)


def _check_pair(cert: bytes, key: bytes, files: TLSFiles) -> None:
    """Fail early and by name on files that are not PEM; gRPC itself only says the handshake failed."""
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise SecurityError(f"the TLS certificate {files.cert} is not a PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise SecurityError(f"the TLS key {files.key} is not a PEM private key")


# ------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens and their roles, kept as sha256 digests."""

    entries: tuple[tuple[bytes, str], ...]
    source: str = ""

    @classmethod
    def from_file(cls, path: Path) -> Tokens:
        """One ``TOKEN [ROLE]`` per line (role ``infer`` when omitted); blank lines and ``#``
        comments are skipped. Errors name the line, never the token."""
        text = _read(path, "token file").decode("utf-8", errors="replace")
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) > 2:
                raise SecurityError(f"{path} line {number}: expected 'TOKEN [ROLE]', got {len(words)} words")
            role = words[1] if len(words) == 2 else "infer"
            if role not in ROLES:
                raise SecurityError(f"{path} line {number}: unknown role {role!r} (roles: {', '.join(ROLES)})")
            if len(words[0]) < 16:
                raise SecurityError(f"{path} line {number}: a token must have at least 16 characters")
            entries.append((_digest(words[0]), role))
        if not entries:
            raise SecurityError(f"{path} holds no token")
        return cls(tuple(entries), str(path))

    def role(self, token: str) -> str | None:
        """The role of ``token`` (None: unknown). Every entry is compared, in constant time each."""
        presented = _digest(token)
        found = None
        for digest, role in self.entries:
            if hmac.compare_digest(presented, digest):
                found = role
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).digest()


def bearer(metadata) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` metadata entry (None: none sent)."""
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


# ------------------------------------------------------------------ access control


@dataclass(frozen=True)
class Security:
    """The server's security settings (``specserve serve`` options)."""

    tls: TLSFiles | None = None
    tokens: Tokens | None = None
    model_control: str = "none"
    reflection: bool = False
    insecure: bool = False
    """Allow a non-loopback address without TLS and tokens."""
    watch: CertificateWatch | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.model_control not in MODEL_CONTROL:
            raise SecurityError(f"unknown model control mode {self.model_control!r} "
                                f"(modes: {', '.join(MODEL_CONTROL)})")
        if self.tls is not None and self.watch is None:
            object.__setattr__(self, "watch", CertificateWatch(self.tls))

    def check_address(self, host: str) -> None:
        """Refuse a non-loopback ``host`` without TLS and tokens, unless ``insecure``."""
        if self.insecure or is_loopback(host) or (self.tls is not None and self.tokens is not None):
            return
        missing = " and ".join(n for n, v in (("TLS (--tls-cert/--tls-key)", self.tls),
                                                ("tokens (--auth-tokens)", self.tokens)) if v is None)
        raise SecurityError(f"refusing to serve on {host} without {missing}: anyone who can reach it could "
                            "use it; add them, bind 127.0.0.1, or pass --insecure to accept the risk")

    def metrics_host(self, host: str) -> str:
        """Where the plain-HTTP metrics listen: on loopback behind TLS or tokens, else on ``host``."""
        return "127.0.0.1" if self.tls is not None or self.tokens is not None else host

    def credentials(self) -> grpc.ServerCredentials | None:
        return self.watch.credentials() if self.watch is not None else None

    def required_role(self, method: str) -> str | None:
        """The weakest role that may call ``method`` (None: open to all)."""
        if method.startswith(HEALTH_PREFIX):
            return None
        return "admin" if method in ADMIN_METHODS else "infer"

    def refusal(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """Why a call of ``method`` with ``metadata`` is refused (None: it may go on). Model
        control is the KServe servicer's business (it answers as Triton does)."""
        if self.tokens is None:
            return None
        needed = self.required_role(method)
        if needed is None:
            return None
        token = bearer(metadata)
        if not token:
            return grpc.StatusCode.UNAUTHENTICATED, "this server needs 'authorization: Bearer TOKEN' metadata"
        role = self.tokens.role(token)
        if role is None:
            return grpc.StatusCode.UNAUTHENTICATED, "unknown token"
        if ROLES.index(role) < ROLES.index(needed):
            return grpc.StatusCode.PERMISSION_DENIED, f"{method.rsplit('/', 1)[-1]} needs the {needed} role"
        return None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls that :meth:`Security.refusal` refuses, before any handler runs or any
    request message is read."""

    def __init__(self, security: Security):
        self.security = security

    async def intercept_service(self, continuation: Callable[..., Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        refused = self.security.refusal(details.method, details.invocation_metadata)
        if handler is None or refused is None:
            return handler
        return _refusing(handler, *refused)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers ``code`` at once."""

    async def unary_response(request, context):
        await context.abort(code, message)

    async def stream_response(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - an async generator that never yields

    serializers = {"request_deserializer": handler.request_deserializer,
                   "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response, **serializers)
    return grpc.stream_stream_rpc_method_handler(stream_response, **serializers)
