"""Client identity: hashed API keys, peer IPs, and X-Forwarded-For only through trusted proxies."""
from __future__ import annotations

import hashlib
import hmac

import pytest

from guard.identity import ClientIdentifier, KeyVerifier, key_entry, parse_address

ANY_KEY = KeyVerifier(check=lambda key: True)


def identifier(secret: bytes | str = "s", **options) -> ClientIdentifier:
    return ClientIdentifier(secret, **options)


def client_of(identifier: ClientIdentifier):
    return lambda scope: identifier.identify(scope).client


def scope(peer: str | None = "203.0.113.7", headers: list[tuple[str, str]] = ()) -> dict:
    return {"type": "http", "client": (peer, 5000) if peer else None,
            "headers": [(name.lower().encode(), value.encode()) for name, value in headers]}


def test_api_key_is_kept_only_as_its_hmac():
    identify = client_of(identifier(b"s3cret", header="X-API-Key", verifier=ANY_KEY))
    client = identify(scope(headers=[("X-API-Key", "alice-key")]))
    assert client == "key:" + hmac.new(b"s3cret", b"alice-key", hashlib.sha256).hexdigest()
    assert "alice-key" not in client
    assert client != identify(scope(headers=[("X-API-Key", "bob-key")]))
    other = identifier(b"other", header="X-API-Key", verifier=ANY_KEY)
    assert client != other.identify(scope(headers=[("X-API-Key", "alice-key")])).client
    # the key names the client wherever it connects from
    assert client == identify(scope(peer="198.51.100.1", headers=[("X-API-Key", "alice-key")]))


def test_configured_header_and_peer_fallback():
    identify = client_of(identifier(header="Authorization", verifier=ANY_KEY))
    assert identify(scope(headers=[("X-API-Key", "k")])) == "ip:203.0.113.7"
    assert identify(scope(headers=[("Authorization", "k")])).startswith("key:")
    assert identify(scope(headers=[("Authorization", "")])) == "ip:203.0.113.7"
    assert client_of(identifier())(scope(headers=[("X-API-Key", "k")])) == "ip:203.0.113.7"
    assert identify(scope(peer=None)) == "ip:unknown"


def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored():
    identify = client_of(identifier(trusted_proxies=["10.0.0.0/8"]))
    for spoof in ["1.2.3.4", "10.0.0.1", "1.2.3.4, 5.6.7.8", "garbage"]:
        assert identify(scope(headers=[("X-Forwarded-For", spoof)])) == "ip:203.0.113.7"


def test_trusted_proxy_chain_takes_right_most_untrusted_hop():
    identify = client_of(identifier(trusted_proxies=["10.0.0.0/8", "192.0.2.1"]))
    behind = "10.1.2.3"
    # the client prepended a fake address; the proxies appended the real one
    assert identify(scope(behind, [("X-Forwarded-For", "6.6.6.6, 198.51.100.9")])) == "ip:198.51.100.9"
    assert identify(scope(behind, [("X-Forwarded-For", "198.51.100.9, 192.0.2.1")])) == "ip:198.51.100.9"
    # several header lines form one list
    assert identify(scope(behind, [("X-Forwarded-For", "198.51.100.9"),
                                   ("X-Forwarded-For", "10.9.9.9")])) == "ip:198.51.100.9"
    # no header, or only trusted hops: the peer itself, never a trusted address named by the header
    assert identify(scope(behind)) == "ip:10.1.2.3"
    assert identify(scope(behind, [("X-Forwarded-For", "10.5.5.5, 10.6.6.6")])) == "ip:10.1.2.3"
    # an unparsable hop stops the walk at the last trusted address
    assert identify(scope(behind, [("X-Forwarded-For", "198.51.100.9, nonsense")])) == "ip:10.1.2.3"


@pytest.mark.parametrize("text, expected", [
    ("1.2.3.4", "1.2.3.4"), (" 1.2.3.4:8080 ", "1.2.3.4"), ("::1", "::1"),
    ("[2001:db8::1]:443", "2001:db8::1"), ("2001:DB8::1", "2001:db8::1"), ("unknown", None), ("", None),
    ("::ffff:10.0.0.1", "10.0.0.1"), ("[::ffff:198.51.100.9]:80", "198.51.100.9")])
def test_parse_address(text, expected):
    address = parse_address(text)
    assert (str(address) if address else None) == expected


def test_secret_required():
    with pytest.raises(ValueError):
        ClientIdentifier(secret="")


def test_an_ipv4_mapped_proxy_is_trusted_and_mapped_peers_are_one_client():
    identify = client_of(identifier(trusted_proxies=["10.0.0.0/8"]))
    for peer in ("::ffff:10.0.0.2", "10.0.0.2"):
        assert identify(scope(peer, [("X-Forwarded-For", "198.51.100.9")])) == "ip:198.51.100.9"
    assert client_of(identifier())(scope("::ffff:203.0.113.7")) == "ip:203.0.113.7"


def test_only_listed_keys_are_clients_and_unknown_ones_are_flagged_or_ignored():
    verifier = KeyVerifier([key_entry("alice-key")])
    strict = identifier(header="X-API-Key", verifier=verifier)
    assert strict.identify(scope(headers=[("X-API-Key", "alice-key")])).client.startswith("key:")
    invented = strict.identify(scope(headers=[("X-API-Key", "invented")]))
    assert invented.rejected and invented.client == "ip:203.0.113.7"
    lenient = identifier(header="X-API-Key", verifier=verifier, unknown_keys="ip")
    assert lenient.identify(scope(headers=[("X-API-Key", "invented")])) == strict.identify(scope())


def test_networks_group_addresses_by_prefix():
    by_24 = identifier(network_prefixes=(24, 48))
    assert by_24.identify(scope("203.0.113.7")).network == "net:203.0.113.0/24"
    assert by_24.identify(scope("2001:db8:1:2::9")).network == "net:2001:db8:1::/48"
    assert identifier().identify(scope("203.0.113.7")).network == "net:203.0.113.7/32"


def test_a_key_header_that_cannot_be_verified_is_refused_at_start():
    with pytest.raises(ValueError, match="cannot be verified"):
        identifier(header="X-API-Key")
    with pytest.raises(ValueError, match="sha256"):
        KeyVerifier(["alice-key"])
