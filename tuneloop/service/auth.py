"""auth: who may ask the service for predictions, and who may label them.

Bearer tokens, each with a name and scopes (`predict`, `feedback`), come from
$TUNELOOP_TOKENS or a secret file ($TUNELOOP_TOKENS_FILE, else
`serve.tokens_file`), never from params.yaml itself. One token a line (or
separated by spaces in the variable):

    labeller-1:feedback:6f1c0c...        name:scope[,scope]:secret
    web-app:predict:91ab3e...

Feedback labels become training rows, so the token's name is stored with each
label (provenance). With no token configured the service answers anyone, and
it refuses to bind beyond loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from tuneloop.service.limits import Receive, Scope, Send, refuse

TOKENS_VARIABLE = "TUNELOOP_TOKENS"
TOKENS_FILE_VARIABLE = "TUNELOOP_TOKENS_FILE"
SCOPES = ("predict", "feedback")
ANONYMOUS = "anonymous"  # the name feedback is stored under when no token is configured (loopback only)
MIN_SECRET_CHARS = 16  # shorter secrets can be guessed over the network
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
SECRET = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: what an HTTP header carries intact


class TokenError(ValueError):
    """The token configuration is unusable; the message never contains a secret."""


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[str]
    secret: str

    def __repr__(self) -> str:  # a secret never reaches a log line
        return f"Token(name={self.name!r}, scopes={sorted(self.scopes)})"


@dataclass(frozen=True)
class Access:
    """The answer to one request's credentials: allowed, or the status and why not."""

    allowed: bool
    name: str | None
    status: int = 200
    reason: str = ""


def parse_tokens(text: str, source: str) -> tuple[Token, ...]:
    """Tokens from `name:scopes:secret` entries (whitespace separated, `#` comments).

    Raises:
        TokenError: naming the entry (by position and name, never by secret) and what is wrong.
    """
    entries = [word for line in text.splitlines() for word in line.split("#", 1)[0].split()]
    tokens: list[Token] = []
    for position, entry in enumerate(entries, start=1):
        name, _, rest = entry.partition(":")
        scopes, _, secret = rest.partition(":")
        where = f"{source}, token {position}"
        if not NAME.match(name):
            raise TokenError(f"{where}: a name is 1-64 letters, digits, _ . @ or -, as name:scopes:secret")
        wanted = frozenset(s for s in scopes.split(",") if s)
        if not wanted or not wanted <= set(SCOPES):
            raise TokenError(f"{where} ({name}): scopes must be some of {list(SCOPES)}, comma separated")
        if len(secret) < MIN_SECRET_CHARS or not SECRET.match(secret):
            raise TokenError(f"{where} ({name}): the secret must be at least {MIN_SECRET_CHARS} printable "
                             "ASCII characters without spaces")
        if any(t.name == name for t in tokens) or any(t.secret == secret for t in tokens):
            raise TokenError(f"{where} ({name}): names and secrets must be unique")
        tokens.append(Token(name, wanted, secret))
    return tuple(tokens)


def load_tokens(tokens_file: str | None, root: Path) -> tuple[Token, ...]:
    """$TUNELOOP_TOKENS beats $TUNELOOP_TOKENS_FILE beats `serve.tokens_file` (relative to root).

    Raises:
        TokenError: a named file is missing or an entry is malformed.
    """
    inline = os.environ.get(TOKENS_VARIABLE)
    if inline:
        return parse_tokens(inline, f"${TOKENS_VARIABLE}")
    named = os.environ.get(TOKENS_FILE_VARIABLE) or tokens_file
    if not named:
        return ()
    path = Path(named) if Path(named).is_absolute() else Path(root) / named
    if not path.is_file():
        raise TokenError(f"token file {path} does not exist")
    return parse_tokens(path.read_text(), str(path))


def authorize(tokens: tuple[Token, ...], authorization: str | None, scope: str) -> Access:
    """Decides one request from its Authorization header.

    With no tokens configured everyone is `anonymous` (bind_refusal keeps that
    on loopback). Otherwise: 401 without a known bearer token, 403 when the
    token lacks `scope`.
    """
    if not tokens:
        return Access(True, ANONYMOUS)
    scheme, _, secret = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return Access(False, None, 401, "send Authorization: Bearer <token>")
    secret = secret.strip()
    # compare every token, in constant time: timing never tells how much of a secret matched
    matches = [t for t in tokens if hmac.compare_digest(t.secret.encode(), secret.encode("utf-8", "replace"))]
    if not matches:
        return Access(False, None, 401, "the bearer token is not a known token")
    token = matches[0]
    if scope not in token.scopes:
        return Access(False, token.name, 403, f"token {token.name!r} has scopes {sorted(token.scopes)}, "
                                              f"not {scope!r}")
    return Access(True, token.name)


class TokenGate:
    """ASGI middleware: a POST to a route that needs a scope is decided from its
    Authorization header alone (401, 403), before a byte of its body is read, so
    a caller without a token can never make the service hold a body."""

    def __init__(self, app: Callable, tokens: tuple[Token, ...], scopes: Mapping[str, str]):
        self.app, self.tokens, self.scopes = app, tokens, dict(scopes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        needed = self.scopes.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" \
            else None
        if needed is not None:
            header = next((value for name, value in scope["headers"] if name.lower() == b"authorization"), b"")
            access = authorize(self.tokens, header.decode("latin-1"), needed)
            if not access.allowed:
                challenge = ((b"www-authenticate", b"Bearer"),) if access.status == 401 else ()
                await refuse(send, access.status, access.reason, challenge)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def bind_refusal(host: str, tokens: tuple[Token, ...]) -> str | None:
    """Why the service must not bind `host`, or None when it may."""
    if is_loopback(host) or tokens:
        return None
    return (f"refusing to serve on {host} without tokens: anyone reaching the port could choose texts and the "
            f"labels that retraining learns from. Set ${TOKENS_VARIABLE} or serve.tokens_file, or bind 127.0.0.1")
