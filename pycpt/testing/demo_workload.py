"""The demo's workload (also used by the tests): random memory and a computation that runs on.

    python /path/to/pycpt/demo_workload.py MIB REPORT [stamped]

(run by path, so that the workload does not import pycpt and maps nothing of it)

Holds MIB MiB of random bytes and iterates a SHA-256 hash chain forever. On SIGUSR1 it
writes "<step> <chain hex> <memory sha256>" to REPORT (atomically), so whoever restores it
can check that memory is intact and that the computation continued exactly where it was:
chain(step2) == sha256^(step2 - step1)(chain(step1)).

`stamped`: the memory is one random 16 KiB block over and over, each 4 KiB page stamped with
its index (every page still distinct, but gzip packs it fast: for compressed dumps of big
containers, where compressing random bytes would take most of the time).
"""

import hashlib
import os
import signal
import sys


def main() -> None:
    """Run the workload until killed."""
    mib, report = int(sys.argv[1]), sys.argv[2]
    if sys.argv[3:] == ["stamped"]:
        memory = bytearray(os.urandom(16 << 10) * (mib << 6))
        for page in range(mib << 8):
            memory[page << 12 : (page << 12) + 8] = page.to_bytes(8, "little")
    else:
        memory = bytearray(os.urandom(mib << 20))
    # (step, chain) in one tuple: a signal handler never sees one updated without the other
    state = (0, hashlib.sha256(b"pycpt").digest())

    def on_usr1(signum: int, frame: object) -> None:
        step, chain = state
        mem = hashlib.sha256(memory).hexdigest()
        with open(report + ".tmp", "w") as f:
            f.write(f"{step} {chain.hex()} {mem}\n")
        os.rename(report + ".tmp", report)

    signal.signal(signal.SIGUSR1, on_usr1)
    with open(report + ".ready.tmp", "w") as f:  # renamed: a reader never sees it empty
        f.write(str(os.getpid()))
    os.rename(report + ".ready.tmp", report + ".ready")
    while True:
        state = (state[0] + 1, hashlib.sha256(state[1]).digest())


def chain_after(chain_hex: str, steps: int) -> str:
    """The chain value `steps` iterations after `chain_hex`."""
    h = bytes.fromhex(chain_hex)
    for _ in range(steps):
        h = hashlib.sha256(h).digest()
    return h.hex()


if __name__ == "__main__":
    main()
