"""A free local TCP port, for a process group's rendezvous or an address nothing listens on."""

import socket


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
