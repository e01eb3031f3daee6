"""TCP addresses as people write them: host, host:port, [v6]:port or a bare v6."""

from .version import DEFAULT_PORT


def parse_tcp_address(text: str) -> tuple[str, int]:
    """Return (host, port) of an address; the port is DEFAULT_PORT unless given.

    Raise ValueError for an empty host or a port that is not 0-65535.
    """
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"not an address: {text!r}")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:  # a name, an IPv4 address or a bare IPv6 address
        host, port_text = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    port = int(port_text) if port_text else DEFAULT_PORT
    if not 0 <= port < 65536:  # 0: a host listening picks a free port
        raise ValueError(f"port {port} is not between 0 and 65535")
    return host, port
