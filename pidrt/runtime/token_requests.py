"""A request's token identity: the `tokens` field and the prompt checks, refused at admission.

A request names a stored token identity (`tokens="tokens-<16 hex>"`) and writes its placeholder
in the prompt. Everything that can make the run fail is checked when the request is submitted,
before it queues (HTTP 400, CLI exit 2): the id's form, the placeholder being in the prompt, no
other `<word>` placeholder without an identity, the token width / layer names / base model, and
the "layers" (P+) reading on a backend whose exported UNet takes one K and one V context.

A placeholder that is not bracketed (an A1111 name such as `me`) cannot be told from a word, so
only `<...>` words are refused when no identity stands for them.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from pidrt.errors import PidrtError
from pidrt.identity.key import ID_RE
from pidrt.models.tokens import MAX_PLACEHOLDER, TokenIdentity, has_placeholder
from pidrt.runtime.requests import InvalidRequest

BRACKETED = re.compile(r"<[^<>\s]{1,%d}>" % MAX_PLACEHOLDER)


def check_tokens_field(tokens) -> str | None:
    """The `tokens` field: None or one token identity id (InvalidRequest otherwise)."""
    if tokens is None or tokens == "":
        return None
    if not isinstance(tokens, str):
        raise InvalidRequest(f"tokens must be one token identity id ('tokens-<16 hex digits>'); got {tokens!r}")
    method = tokens.split("-", 1)[0]
    if method != "tokens" and ID_RE.match(tokens):
        raise InvalidRequest(f"tokens names {tokens}, a {method} identity; put it in `identity`, and a token "
                             "identity ('tokens-…') in `tokens`")
    return tokens  # a malformed id is the store's "unknown identity"


def check_identity_field(identity: str) -> None:
    if isinstance(identity, str) and identity.startswith("tokens-"):
        raise InvalidRequest(f"identity {identity} is a token identity; name it in `tokens` (and write its "
                             "placeholder in the prompt)")


def stray_placeholders(prompt: str, identity: TokenIdentity | None) -> list[str]:
    """`<word>`s of `prompt` that no token identity of the request stands for."""
    own = identity.placeholder.lower() if identity is not None else None
    return [m for m in dict.fromkeys(BRACKETED.findall(prompt)) if m.lower() != own]


def admit_tokens(prompt: str, identity: TokenIdentity | None, tokens_id: str | None, *, text_dim: int,
                 cross_layers: Sequence[str] | None, base_model: Callable[[], str] | None = None,
                 layers_refusal: str | None = None) -> None:
    """InvalidRequest for a request whose token identity (or its absence) cannot run.

    base_model(): the served base model's fingerprint, asked for only when the identity names the
    model it was trained for. layers_refusal: why this backend cannot run the "layers" reading
    (None: it can).
    """
    stray = stray_placeholders(prompt, identity)
    if stray:
        what = f"token identity {tokens_id} stands for {identity.placeholder!r}" if identity is not None else \
            "the request names no token identity (`tokens`)"
        raise InvalidRequest(f"prompt has the placeholder {stray[0]!r} but {what}")
    if identity is None:
        return
    if not has_placeholder(prompt, identity.placeholder):
        raise InvalidRequest(f"prompt {prompt!r} does not contain the placeholder {identity.placeholder!r} of token "
                             f"identity {tokens_id}; write it where the subject goes")
    if identity.reading == "layers" and layers_refusal:
        raise InvalidRequest(f"token identity {tokens_id}: {layers_refusal}")
    try:
        identity.check(text_dim, cross_layers, base_model() if identity.base_model and base_model else None)
    except PidrtError as exc:
        raise InvalidRequest(str(exc)) from None


def enroll_tokens(enroller, files: Sequence[bytes], placeholder: str | None = None,
                  names: Sequence[str] | None = None, **options):
    """`Generator.enroll(files, "tokens", ...)`: one token file's bytes into the store; `names[0]`
    (its file name) gives the placeholder of layouts that take it from the name, `placeholder`
    overrides the file's. Returns pidrt.identity.enroll.Enrollment."""
    unused = sorted(k for k, v in options.items() if v is not None)
    if unused:
        raise InvalidRequest(f"{unused} do not apply to token identities (they take a token file and a placeholder)")
    if len(files) != 1 or not isinstance(files[0], (bytes, bytearray)) or not files[0]:
        raise InvalidRequest(f"token enrollment takes one non-empty token file; got {len(files)} file(s)")
    try:
        return enroller.enroll_tokens(bytes(files[0]), names[0] if names else "tokens", placeholder)
    except InvalidRequest:
        raise
    except PidrtError as exc:  # a bad file is the request's fault
        raise InvalidRequest(str(exc)) from None
