"""The KV rendezvous store's listening socket (docs/SECURITY.md)."""

from __future__ import annotations

from kv_transfer import host_store, join_store


def test_rendezvous_store_listens_on_its_host_only():
    """TCPStore alone listens on every interface; host_store binds the socket it is given."""
    store = host_store("127.0.0.1", 0, timeout_s=5)
    listening = _listening_addresses()
    assert ("127.0.0.1", store.port) in listening, listening
    assert all(host == "127.0.0.1" for host, port in listening if port == store.port), listening
    client = join_store("127.0.0.1", store.port, timeout_s=5)
    client.set("k", "v")
    assert store.get("k") == b"v"


def _listening_addresses() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this host, from /proc/net/tcp{,6}."""
    found = set()
    for path, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(path) as table:
            for line in list(table)[1:]:
                local, state = line.split()[1], line.split()[3]
                if state != "0A":  # LISTEN
                    continue
                address, port = local.split(":")
                found.add((_proc_address(address, width), int(port, 16)))
    return found


def _proc_address(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    if words[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in words[12:])
    return "::" if words == b"\0" * 16 else words.hex()
