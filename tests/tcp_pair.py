"""A TCP client and server in one process, talking over loopback without pause: the client
sends a counter, the server echoes it, the client checks every echo. SIGUSR1 writes
"<round trips> <client port> <connections accepted> <errors>" to the report file.

    python tcp_pair.py REPORT      (REPORT.ready appears once connected)
"""

import signal
import socket
import struct
import sys
import threading
import time


def main(report: str) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    state = {"accepted": 0, "rounds": 0, "errors": 0}

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            state["accepted"] += 1
            while True:
                data = conn.recv(8)
                if not data:
                    break
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    client = socket.create_connection(server.getsockname())
    port = client.getsockname()[1]

    def on_usr1(signum, frame):
        with open(report + ".tmp", "w") as f:
            f.write(f"{state['rounds']} {port} {state['accepted']} {state['errors']}\n")
        import os

        os.rename(report + ".tmp", report)

    signal.signal(signal.SIGUSR1, on_usr1)
    open(report + ".ready", "w").close()
    n = 0
    while True:
        n += 1
        client.sendall(struct.pack("<Q", n))
        echo = b""
        while len(echo) < 8:
            chunk = client.recv(8 - len(echo))
            if not chunk:
                state["errors"] += 1
                time.sleep(1)
                break
            echo += chunk
        if echo != struct.pack("<Q", n):
            state["errors"] += 1
        state["rounds"] = n
        time.sleep(0.002)


if __name__ == "__main__":
    main(sys.argv[1])
