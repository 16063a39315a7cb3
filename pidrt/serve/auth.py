"""API keys for the HTTP service: `Authorization: Bearer <key>`, two roles, checked before routing.

Keys come from a file (`pidrt serve --api-key-file FILE`) and/or the `PIDRT_API_KEYS`
environment variable. One key per line (file) or per comma (variable), optionally followed by
its role after whitespace; `#` starts a comment:

    8f3c2a...d1   admin       # may enroll and delete identities, and generate
    77b0e1...9a   generate    # generations, edits, jobs, listing identities, stats

A key without a role is `admin`. `admin` implies `generate`: an operator who enrolls an identity
can try it with the same key, while a service that should only generate gets a `generate` key.

Without a key, or with an unknown one: 401 (with `WWW-Authenticate: Bearer`); a `generate` key
on enroll or delete: 403. `/healthz` and `/readyz` are always open (probes carry no key),
`/metrics` only with `public_metrics`. Only sha256 digests of the keys are kept, every digest
is compared with `hmac.compare_digest` (no early exit, so the time does not depend on which key,
if any, matched), and keys are never logged: logs name a key by its position in its source.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from pidrt.errors import PidrtError

log = logging.getLogger(__name__)

ENV_VAR = "PIDRT_API_KEYS"
ROLES = ("generate", "admin")
MIN_KEY_CHARS = 16
_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces (what a Bearer token may hold)
OPEN_PATHS = ("/healthz", "/readyz")


@dataclass(frozen=True)
class ApiKey:
    digest: bytes = field(repr=False)  # sha256 of the key; the key itself is not kept
    role: str
    label: str  # where it came from, for logs ("key 2 of /etc/pidrt/keys")


@dataclass(frozen=True)
class AuthConfig:
    keys: tuple[ApiKey, ...] = ()
    public_metrics: bool = False  # /metrics without a key (a scraper inside the trusted network)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("ascii", "replace")).digest()


def parse_keys(text: str, where: str, separators: str = "\n") -> list[ApiKey]:
    """Keys of one source: entries split on `separators`, each `KEY [ROLE]`, `#` comments."""
    entries = [text] if not separators else re.split(f"[{re.escape(separators)}]", text)
    out: list[ApiKey] = []
    for n, entry in enumerate(entries, 1):
        words = entry.split("#", 1)[0].split()
        if not words:
            continue
        label = f"entry {n} of {where}"
        if len(words) > 2:
            raise PidrtError(f"{label}: expected 'KEY' or 'KEY ROLE', got {len(words)} words")
        key, role = words[0], words[1] if len(words) == 2 else "admin"
        if role not in ROLES:
            raise PidrtError(f"{label}: unknown role {role!r}; choose one of {list(ROLES)}")
        if len(key) < MIN_KEY_CHARS or not _KEY_RE.match(key):
            raise PidrtError(f"{label}: a key must be at least {MIN_KEY_CHARS} printable ASCII characters "
                             "without spaces (e.g. from: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        out.append(ApiKey(_digest(key), role, label))
    return out


def load_auth(key_file: Path | None = None, env: Mapping[str, str] | None = None,
              public_metrics: bool = False) -> AuthConfig:
    """Keys from `key_file` and the PIDRT_API_KEYS variable (both may be given; none: no auth)."""
    env = os.environ if env is None else env
    keys: list[ApiKey] = []
    if key_file is not None:
        path = Path(key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PidrtError(f"cannot read the API key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        found = parse_keys(text, str(path))
        if not found:
            raise PidrtError(f"the API key file {path} holds no keys")
        keys += found
    if env.get(ENV_VAR, "").strip():
        keys += parse_keys(env[ENV_VAR], ENV_VAR, separators=",\n")
    roles: dict[bytes, str] = {}
    for k in keys:
        if roles.setdefault(k.digest, k.role) != k.role:
            raise PidrtError(f"{k.label}: the same key is listed with two roles")
    return AuthConfig(tuple(keys), public_metrics)


def required_role(method: str, path: str, config: AuthConfig) -> str | None:
    """The role a request needs (None: open). Unknown paths need a key too, so a client without
    one learns nothing about which routes exist."""
    if path in OPEN_PATHS or (path == "/metrics" and config.public_metrics):
        return None
    if path.rstrip("/").startswith("/v1/identities") and method in ("POST", "DELETE"):
        return "admin"
    return "generate"


def match(config: AuthConfig, authorization: str | None) -> ApiKey | None:
    """The key a Bearer header carries, or None. Constant time in the key's content."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    presented = _digest(token)
    found = None
    for key in config.keys:  # no early exit
        if hmac.compare_digest(presented, key.digest):
            found = key
    return found


def allows(key: ApiKey, role: str) -> bool:
    return key.role == "admin" or key.role == role


class ApiKeyAuth:
    """Pure ASGI middleware: answers 401 / 403 in the one error shape before the app runs."""

    def __init__(self, app, config: AuthConfig, on_refused=None):
        self.app, self.config, self.on_refused = app, config, on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.config.enabled:
            return await self.app(scope, receive, send)
        role = required_role(scope.get("method", "GET"), scope.get("path", ""), self.config)
        if role is None:
            return await self.app(scope, receive, send)
        from pidrt.serve.errors import error_json

        header = dict(scope.get("headers") or []).get(b"authorization")
        key = match(self.config, None if header is None else header.decode("latin-1"))
        if key is None:
            response = error_json(401, "unauthorized", "a valid API key is required: send 'Authorization: Bearer <key>'",
                                  headers={"WWW-Authenticate": "Bearer"})
        elif not allows(key, role):
            response = error_json(403, "forbidden", f"this API key has the role '{key.role}'; "
                                                    f"this request needs '{role}'")
        else:
            return await self.app(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused(response.status_code)
        await response(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, config: AuthConfig, allow_unauthenticated: bool = False) -> None:
    """Refuse to expose an unauthenticated server beyond loopback unless told to; warn either way."""
    if config.enabled:
        roles = sorted({k.role for k in config.keys})
        log.info("API keys required: %d key(s), roles %s; /metrics %s", len(config.keys), roles,
                 "open" if config.public_metrics else "needs a key")
        return
    if not is_loopback(host) and not allow_unauthenticated:
        raise PidrtError(f"refusing to serve {host} without API keys: anyone who reaches it could generate, enroll "
                         f"and delete identities. Give keys (--api-key-file FILE or {ENV_VAR}), bind 127.0.0.1, "
                         "or pass --allow-unauthenticated")
    log.warning("pidrt serve is UNAUTHENTICATED: anyone who can reach %s may generate, enroll and delete "
                "identities (give --api-key-file or %s to require keys)", host, ENV_VAR)


def add_auth_arguments(p) -> None:
    """`pidrt serve`'s key options."""
    p.add_argument("--api-key-file", type=Path, default=None,
                   help=f"API keys, one per line: KEY [generate|admin] (no role: admin); also read from "
                        f"${ENV_VAR} (comma-separated). Without keys the server is unauthenticated and binds "
                        "loopback only")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without a key")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without API keys")


def auth_from_args(a) -> AuthConfig:
    return load_auth(a.api_key_file, public_metrics=a.public_metrics)
