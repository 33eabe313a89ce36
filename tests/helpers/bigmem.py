"""A container init holding SIZE bytes of written memory (argv: SIZE REPORT).

Every 4 KiB page is different (a random 1 MiB pattern, and each page's index in its first
8 bytes), so that a page lost, moved or changed shows in the checksum. When ready it writes
the BLAKE3 of its memory to REPORT.ready; on SIGUSR1 it hashes its memory again and writes
REPORT (so a restored copy can prove its memory intact). Runs until killed.
"""

import os
import signal
import struct
import sys

import blake3

PAGE = 4096
MIB = 1 << 20


def main() -> None:
    size, report = int(sys.argv[1]), sys.argv[2]
    memory = bytearray(size)
    view = memoryview(memory)
    pattern = os.urandom(MIB)
    for offset in range(0, size, MIB):
        n = min(MIB, size - offset)
        view[offset : offset + n] = pattern[:n]
    for page in range(size // PAGE):
        struct.pack_into("<Q", memory, page * PAGE, page)

    def digest() -> str:
        return blake3.blake3(memory, max_threads=blake3.blake3.AUTO).hexdigest()

    def write(path: str, text: str) -> None:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.rename(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, lambda *_: write(report, digest()))
    write(report + ".ready", digest())
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
