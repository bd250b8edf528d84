"""Local addresses: which hosts are loopback (the only ones plaintext links may use), and a
listening socket."""
from __future__ import annotations

import ipaddress
import socket

__all__ = ["is_loopback", "listen"]


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False



def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (port 0: the OS picks a free port; read it with getsockname)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(socket.SOMAXCONN)   # a burst waits in the kernel, not refused
    return s
