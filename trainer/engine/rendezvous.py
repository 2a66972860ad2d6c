"""A free local TCP port for a one-node rendezvous (MASTER_PORT). Standard library only, so the
launcher's planning path and the tests can use it without importing DeepSpeed."""
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
