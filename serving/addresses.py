"""host:port addresses, as the services' flags and the internal protocol spell them (IPv6 in brackets)."""

from collections.abc import Iterable


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def parse_addresses(addresses: str | Iterable[str]) -> list[str]:
    """``"a:1, b:2"`` or ``["a:1", "b:2"]`` -> validated ``["a:1", "b:2"]``."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    out = [item.strip() for item in items if item.strip()]
    for item in out:
        split_host_port(item)
    return out
