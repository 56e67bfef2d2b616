"""A TCP relay on 127.0.0.1 in its own process: the "endpoint" whose outage the storage tests inject.

    python relay.py LISTEN_PORT TARGET_PORT

Clients talk to LISTEN_PORT; every connection is piped to TARGET_PORT (the real moto S3 server). Killing this process
(SIGKILL) is an outage as a client sees it: the port refuses new connections and every open connection is reset at
once. The store behind it keeps its objects, as a real object store does while its endpoint is unreachable, so the
test can check afterwards that nothing already written was lost. Starting it again on the same port ends the outage.
"""

from __future__ import annotations

import socket
import sys
import threading


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(listen_port: int, target_port: int) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(128)
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
