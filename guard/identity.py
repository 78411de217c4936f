"""Who the client is: an API key from a configured header, kept only as a keyed hash
(HMAC-SHA256 with a server secret), else the peer's IP address. ``X-Forwarded-For`` is honoured only
when the immediate peer is a configured trusted proxy, and then the client is the right-most address
that is not itself a trusted proxy (the scheme of MDN's *X-Forwarded-For* "trusted proxy list"
guidance), so a client cannot choose its identity by writing the header itself."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IPAddress | None:
    """An IP address from a header entry (``1.2.3.4``, ``1.2.3.4:80``, ``::1``, ``[::1]:80``), or None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class ClientIdentifier:
    """Names the client of an ASGI HTTP ``scope`` as ``key:<hmac hex>`` or ``ip:<address>``.

    ``secret`` keys the HMAC; every worker and replica must share it, so they name a client alike.
    ``trusted_proxies`` are addresses or CIDR networks of the reverse proxies in front of the app.
    """

    def __init__(self, secret: bytes | str, header: str | None = "X-API-Key",
                 trusted_proxies: Sequence[str] = ()):
        if not secret:
            raise ValueError("an identity secret is required to hash API keys")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._header = header.lower().encode("latin-1") if header else None
        self._trusted = [ipaddress.ip_network(proxy, strict=False) for proxy in trusted_proxies]

    def hash_key(self, key: bytes) -> str:
        """The stored form of an API key: ``key:`` + HMAC-SHA256(secret, key) in hex."""
        return "key:" + hmac.new(self._secret, key, hashlib.sha256).hexdigest()

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)

    def client_address(self, peer: str | None, forwarded_for: Iterable[bytes]) -> str:
        """The client's address: the peer itself unless it is a trusted proxy; then, walking the
        ``X-Forwarded-For`` hops right to left, the first one that is not a trusted proxy. Stops at
        an unparsable hop (it was written by someone untrusted) and keeps the last trusted hop."""
        current = parse_address(peer) if peer else None
        if current is None:
            return peer or "unknown"
        hops = [hop for value in forwarded_for for hop in value.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if not self.is_trusted(current):
                break
            address = parse_address(hop)
            if address is None:
                break
            current = address
        return str(current)

    def identify(self, scope: dict) -> str:
        """The client's identity for an ASGI HTTP ``scope``."""
        headers = scope.get("headers") or []
        if self._header is not None:
            key = next((value for name, value in headers if name == self._header and value), None)
            if key is not None:
                return self.hash_key(key)
        peer = scope.get("client")
        if not self._trusted and peer:  # no proxy to believe: the peer is the client, as the server named it
            return "ip:" + peer[0]
        forwarded = [value for name, value in headers if name == b"x-forwarded-for"]
        return "ip:" + self.client_address(peer[0] if peer else None, forwarded)
