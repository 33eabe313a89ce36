"""A table of a container's own in nf_tables, made and looked for from outside, without the
`nft` binary (not installed here): one nfnetlink message each, built with struct.

    in_netns(pid, "add", "w12-own")     # `nft add table inet w12-own` in pid's namespace
    in_netns(pid, "has", "w12-own")     # True / False

Run as a script (`python nft.py add|has NAME`) it acts in its own network namespace, so
in_netns runs it under `nsenter -t PID -n`.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE = 0, 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NFPROTO_INET = 1
NFTA_TABLE_NAME = 1


def _msg(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes = b"") -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def _name(name: str) -> bytes:
    data = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(data), NFTA_TABLE_NAME) + data
    return attr + b"\0" * (-len(attr) % 4)


def _first_error(sk: socket.socket) -> int:
    reply = sk.recv(65536)
    while reply:
        length, kind = struct.unpack_from("=IH", reply)
        if kind == NLMSG_ERROR:
            return -struct.unpack_from("=i", reply, 16)[0]
        reply = reply[(length + 3) & ~3 :]
    return 0


def act(op: str, name: str) -> bool:
    """In this process's network namespace: "add" the table (True), or tell whether it "has"
    it."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sk:
        kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWTABLE if op == "add" else NFT_MSG_GETTABLE)
        if op == "add":
            sk.send(
                _msg(NFNL_MSG_BATCH_BEGIN, 0, 1, 0, NFNL_SUBSYS_NFTABLES)
                + _msg(kind, NLM_F_ACK | NLM_F_CREATE, 2, NFPROTO_INET, 0, _name(name))
                + _msg(NFNL_MSG_BATCH_END, 0, 3, 0, NFNL_SUBSYS_NFTABLES)
            )
            err = _first_error(sk)
            if err:
                raise OSError(err, f"cannot add table inet {name}")
            return True
        sk.send(_msg(kind, NLM_F_ACK, 1, NFPROTO_INET, 0, _name(name)))
        return _first_error(sk) == 0


def in_netns(pid: int, op: str, name: str) -> bool:
    """act(op, name) in the network namespace of `pid`."""
    out = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", sys.executable, __file__, op, name],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip() == "True"


if __name__ == "__main__":
    print(act(sys.argv[1], sys.argv[2]))
