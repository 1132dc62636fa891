"""A TCP port held for a test's servers (:class:`ReservedPort`). Free of torch: a fresh
interpreter that needs only the port (tests/test_ranks_harness.py's probe in a network
namespace) starts in a fraction of a second, not the seconds an import of torch costs."""

from __future__ import annotations

import socket


class ReservedPort:
    """A TCP port that no other process is given, on any local address, while this object is
    open; servers of the test bind it on 127.0.0.1 or on every address.

    A port picked by binding port 0 and closing the socket is free only until someone else binds
    it (a gloo rank of the other xdist worker listens on a port of its own every time). Here a
    socket of this process stays bound to the port, with SO_REUSEADDR, and never listens. It is
    bound on every address (``::`` accepting IPv4 too, or ``0.0.0.0`` where there is no IPv6),
    not on 127.0.0.1 alone: a port held on one address only is still free on the others, and a
    gloo rank listens on the address its hostname resolves to (127.0.1.1 on Debian-style hosts),
    so the kernel could give it the port, after which torch's TCPStore, which listens on every
    address, could not bind it. Held on every address, the kernel gives the port to no bind to
    port 0 and to no outgoing connection on any address; a server that sets SO_REUSEADDR too
    (werkzeug, under moto, on 127.0.0.1; torch's TCPStore, on every address) can bind it and
    listen, and again after that server died. While nothing listens on it, a connection to it
    is refused.
    """

    def __init__(self) -> None:
        self._socket = _socket_on_every_address()
        self.port: int = self._socket.getsockname()[1]

    def close(self) -> None:
        """Give the port back."""
        self._socket.close()

    def __enter__(self) -> ReservedPort:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _socket_on_every_address() -> socket.socket:
    """A socket with SO_REUSEADDR bound to a port of the kernel's choice on every local
    address: IPv6's ``::`` with IPv4 accepted too (as torch's TCPStore listens), else, without
    IPv6, ``0.0.0.0``."""
    try:
        dual_stack = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # no IPv6 in this kernel or network namespace
        pass
    else:
        try:
            dual_stack.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The default may be v6-only (net.ipv6.bindv6only): the IPv4 addresses too.
            dual_stack.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            dual_stack.bind(("::", 0))
        except OSError:  # IPv6 present but unusable (disabled on every interface)
            dual_stack.close()
        else:
            return dual_stack
    ipv4_only = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ipv4_only.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ipv4_only.bind(("0.0.0.0", 0))
    return ipv4_only
