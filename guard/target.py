"""The request target, read once per request: the one path the guard matches routes on, the app (or
the upstream) routes on, and the proxy forwards.

Only origin-form targets are accepted (``/path?query``; RFC 9112 section 3.2.1): absolute-form,
authority-form, ``*`` and anything else not starting with ``/`` are refused (``400``), as are
backslashes, control characters (NUL included), malformed or doubly applied percent-escapes, text
that is not UTF-8 once decoded, and targets over ``MAX_TARGET_BYTES`` (``414``). The path is
percent-decoded as uvicorn decodes ``scope["path"]`` (``%2F`` is a ``/``, as Starlette routes on it),
its dot segments removed as RFC 3986 section 5.2.4 removes them, and encoded again with every
character outside RFC 3986's ``pchar`` escaped: what is forwarded holds no dot segment nor an escape
a server could decode into one, so no server or client library after the guard changes it.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from starlette.types import Scope

MAX_TARGET_BYTES = 8192  # path and query: far above any prediction API's, far below servers' limits

# A path that is canonical as it stands: pchars only (no escape, no backslash, no control), no dot segment.
_CANONICAL = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_DOT_SEGMENT = re.compile(rb"/\.\.?(?:/|$)")
_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")  # a '%' not followed by two hex digits
_DECODED_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")
_QUERY_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f#\\]")
_PCHAR_SAFE = "/!$&'()*+,;=:@~"  # with quote's unreserved: what needs no escape in a path

class TargetRefused(Exception):
    """A request target the guard does not accept: ``status`` 400 or 414, ``reason`` for the metrics."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(f"{status} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True, slots=True)
class Target:
    """A canonical path: ``path`` decoded (what routers match), ``raw_path`` encoded (what is sent)."""

    path: str
    raw_path: bytes


@functools.lru_cache(maxsize=4096)
def canonical(raw_path: bytes) -> Target:
    """The canonical form of a received path (without its query); ``TargetRefused`` when refused."""
    if len(raw_path) > MAX_TARGET_BYTES:
        raise TargetRefused(414, "target_too_long", f"the request target exceeds {MAX_TARGET_BYTES} bytes")
    if _CANONICAL.fullmatch(raw_path) and not _DOT_SEGMENT.search(raw_path):
        return Target(raw_path.decode("ascii"), raw_path)
    if not raw_path.startswith(b"/"):
        raise TargetRefused(400, "target_form",
                            "only origin-form request targets ('/path?query') are accepted")
    if _ESCAPE.search(raw_path):
        raise TargetRefused(400, "bad_escape", "the path holds a '%' that is not a percent-escape")
    try:
        decoded = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise TargetRefused(400, "bad_encoding", "the decoded path is not UTF-8") from None
    if _FORBIDDEN.search(decoded):
        raise TargetRefused(400, "bad_character", "the path holds a backslash or a control character")
    if _DECODED_ESCAPE.search(decoded):
        raise TargetRefused(400, "double_escape", "the path is percent-encoded twice")
    path = remove_dot_segments(decoded)
    return Target(path, quote(path, safe=_PCHAR_SAFE).encode("ascii"))


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path: ``.`` and ``..`` segments resolved, never above
    the root; a path ending in one of them keeps its trailing ``/``."""
    segments = path.split("/")[1:]
    output: list[str] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
            continue
        if i == last:
            output.append("")
    return "/" + "/".join(output)


def check_query(query: bytes) -> None:
    """Refuse a query string no URL may carry (controls, spaces, ``#``, backslashes) or too long."""
    if len(query) > MAX_TARGET_BYTES:
        raise TargetRefused(414, "target_too_long", f"the request target exceeds {MAX_TARGET_BYTES} bytes")
    if _QUERY_FORBIDDEN.search(query):
        raise TargetRefused(400, "bad_character", "the query holds a character no URL may carry")


def canonical_scope(scope: Scope) -> Scope:
    """``scope`` with its path and raw path canonical (the same object when they already are);
    ``TargetRefused`` when its target is refused."""
    raw_path = scope.get("raw_path")
    if raw_path is None:
        raw_path = quote(scope["path"], safe=_PCHAR_SAFE).encode("ascii")
    query = scope.get("query_string", b"")
    if query:
        check_query(query)
    target = canonical(raw_path)
    if target.raw_path == raw_path and target.path == scope["path"]:
        return scope
    return {**scope, "path": target.path, "raw_path": target.raw_path}
