"""Who the client is: a *verified* API key from a configured header, kept only as a keyed hash
(HMAC-SHA256 with a server secret), else the peer's IP address; and the network it comes from, whose
budget every key from it shares (so inventing or registering many keys does not multiply it).

Keys are checked against SHA-256 digests of the valid keys (listed in the policy or a file) or by a
callable the application passes (its own key store). An unknown key is refused (``401``) or, if the
policy says so, ignored: the client is then its IP, exactly as without the header.

``X-Forwarded-For`` is honoured only when the immediate peer is a configured trusted proxy, and then
the client is the right-most address that is not itself a trusted proxy (the scheme of MDN's
*X-Forwarded-For* "trusted proxy list" guidance), so a client cannot choose its identity by writing
the header itself; when every hop is a trusted proxy the client is the peer, so no trusted address
is ever named through the header. IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) are the IPv4
addresses they carry.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
KeyCheck = Callable[[str], bool]

# How many (peer, X-Forwarded-For) pairs keep their parsed address and network.
ADDRESS_CACHE_SIZE = 4096


def parse_address(text: str) -> IPAddress | None:
    """An IP address from a header entry (``1.2.3.4``, ``1.2.3.4:80``, ``::1``, ``[::1]:80``), or None;
    an IPv4-mapped IPv6 address as its IPv4 address."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def key_entry(key: str) -> str:
    """The policy's entry for a valid API key: ``sha256:<hex digest>`` (the key itself is never stored)."""
    return "sha256:" + hashlib.sha256(key.encode("latin-1")).hexdigest()


def key_digest(entry: str) -> bytes:
    """The SHA-256 digest a key-list entry names: ``sha256:<64 hex digits>``."""
    kind, _, digest = entry.strip().partition(":")
    if kind != "sha256" or len(digest) != 64:
        raise ValueError(f"API key entries are 'sha256:<64 hex digits>', got {entry[:12]!r}...")
    return bytes.fromhex(digest)


def read_key_file(path: str | Path) -> list[str]:
    """The entries of a key file: one ``sha256:<hex>`` per line; blank lines and ``#`` comments skipped."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line]


class KeyVerifier:
    """Whether an API key is valid: its SHA-256 digest is listed, or ``check(key)`` says so."""

    def __init__(self, entries: Iterable[str] = (), check: KeyCheck | None = None) -> None:
        self._digests = frozenset(key_digest(entry) for entry in entries)
        self._check = check

    def __bool__(self) -> bool:
        return bool(self._digests) or self._check is not None

    def __call__(self, key: bytes) -> bool:
        if hashlib.sha256(key).digest() in self._digests:
            return True
        return self._check is not None and bool(self._check(key.decode("latin-1")))


@dataclass(frozen=True)
class Identity:
    """``client``: ``key:<hmac hex>`` or ``ip:<address>``; ``network``: ``net:<CIDR>`` of its address;
    ``rejected``: it sent an API key that is not valid (and the policy refuses those); ``address``:
    the IP address the request came from (through trusted proxies)."""

    client: str
    network: str
    rejected: bool = False
    address: str = ""


class ClientIdentifier:
    """Names the client of an ASGI HTTP ``scope``.

    ``secret`` keys the HMAC; every worker and replica must share it, so they name a client alike.
    ``header``: the API-key header (None: peer IP only); ``verifier`` decides which keys are valid;
    ``unknown_keys``: ``"reject"`` or ``"ip"``. ``trusted_proxies`` are addresses or CIDR networks of
    the reverse proxies in front of the app. ``network_prefixes``: the (IPv4, IPv6) prefix lengths of
    the network an address's budget is counted under.
    """

    def __init__(self, secret: bytes | str, header: str | None = None, trusted_proxies: Sequence[str] = (),
                 verifier: KeyVerifier | None = None, unknown_keys: str = "reject",
                 network_prefixes: tuple[int, int] = (32, 64)):
        if not secret:
            raise ValueError("an identity secret is required to hash API keys")
        verifier = verifier or KeyVerifier()
        if header and not verifier and unknown_keys == "reject":
            raise ValueError(f"API keys in {header!r} cannot be verified: list their digests (identity.keys, "
                             "identity.keys_file) or pass verify_key, or set unknown_keys = 'ip'")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._header = header.lower().encode("latin-1") if header else None
        self._verifier = verifier
        self._reject = unknown_keys == "reject"
        self._trusted = [ipaddress.ip_network(proxy, strict=False) for proxy in trusted_proxies]
        self._prefixes = {4: network_prefixes[0], 6: network_prefixes[1]}
        # Parsing addresses is most of the cost of naming a client: the (peer, X-Forwarded-For) pairs
        # seen lately keep their (address, network), in a bounded cache (least recently used out).
        self._located = functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)(self._locate)

    def hash_key(self, key: bytes) -> str:
        """The stored form of an API key: ``key:`` + HMAC-SHA256(secret, key) in hex."""
        return "key:" + hmac.new(self._secret, key, hashlib.sha256).hexdigest()

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)

    def client_address(self, peer: str | None, forwarded_for: Iterable[bytes]) -> str:
        """The client's address: the peer itself unless it is a trusted proxy; then, walking the
        ``X-Forwarded-For`` hops right to left, the first one that is not a trusted proxy. Stops at
        an unparsable hop (it was written by someone untrusted); a walk that finds no untrusted hop
        gives the peer itself."""
        peer_address = parse_address(peer) if peer else None
        if peer_address is None:
            return peer or "unknown"
        current = peer_address
        hops = [hop for value in forwarded_for for hop in value.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if not self.is_trusted(current):
                break
            address = parse_address(hop)
            if address is None:
                break
            current = address
        return str(peer_address if self.is_trusted(current) else current)

    def network(self, address: str) -> str:
        """``net:<CIDR>``: the configured prefix around ``address`` (the address itself if unparsable)."""
        parsed = parse_address(address)
        if parsed is None:
            return "net:" + address
        network = ipaddress.ip_network(f"{parsed}/{self._prefixes[parsed.version]}", strict=False)
        return f"net:{network}"

    def _locate(self, peer: str | None, forwarded: tuple[bytes, ...]) -> tuple[str, str, Identity]:
        address = self.client_address(peer, forwarded)
        network = self.network(address)
        return address, network, Identity("ip:" + address, network, address=address)

    def locate(self, scope: dict) -> tuple[str, str, Identity]:
        """The client's IP address (through trusted proxies only), its network, and its identity
        without an API key, for an ASGI ``scope``."""
        peer = scope.get("client")
        forwarded = tuple(value for name, value in scope.get("headers") or [] if name == b"x-forwarded-for"
                          ) if self._trusted else ()
        return self._located(peer[0] if peer else None, forwarded)

    def address(self, scope: dict) -> str:
        """The client's IP address for an ASGI ``scope`` (through trusted proxies only)."""
        return self.locate(scope)[0]

    def identify(self, scope: dict) -> Identity:
        """The client's identity for an ASGI HTTP ``scope``."""
        address, network, by_address = self.locate(scope)
        if self._header is not None:
            key = next((value for name, value in scope.get("headers") or [] if name == self._header and value),
                       None)
            if key is not None:
                if self._verifier(key):
                    return Identity(self.hash_key(key), network, address=address)
                if self._reject:
                    return Identity(by_address.client, network, rejected=True, address=address)
        return by_address
