"""Thin wrappers over the C shims of csrc/nic.c: links, addresses, routes, bridge ports,
duplicate-address probes, announcements and the RFC 6069 kick. Every failure is the OSError
of its -errno (ENODEV, EEXIST, EBUSY, ...) naming what was asked; pycpt.network turns them
into pycpt's errors.

Sockets are plain descriptors owned by a `Sockets` (closed by `close()` or `with`), made in
the namespace they must act in (netlink and packet sockets stay bound to it).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from pycpt._native import check, ffi, lib

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

PORT_DISABLED = int(lib.PYCPT_NIC_PORT_DISABLED)
PORT_FORWARDING = int(lib.PYCPT_NIC_PORT_FORWARDING)


def mac_bytes(mac: str) -> bytes:
    """'02:ab:...' -> 6 bytes (the caller has validated the text)."""
    return bytes(int(part, 16) for part in mac.split(":"))


def mac_text(raw: bytes) -> str:
    """6 bytes -> '02:ab:...'."""
    return ":".join(f"{b:02x}" for b in raw)


def _family(ip: IPAddress) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def netns_new() -> int:
    """A new, empty network namespace; the descriptor is its only holder."""
    fd = ffi.new("int *")
    check(lib.pycpt_nic_netns_new(fd), "a new network namespace")
    return int(fd[0])


def open_netns(pid: int) -> int:
    """A descriptor of the network namespace of `pid`."""
    return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def socket_in(nsfd: int, domain: int, kind: int, proto: int) -> int:
    """socket(domain, kind, proto) made in namespace nsfd (-1: ours); a descriptor."""
    fd = ffi.new("int *")
    check(lib.pycpt_nic_socket_in(nsfd, domain, kind, proto, fd), "a socket")
    return int(fd[0])


@dataclass
class Link:
    """What pycpt_nic_link_get says about a link."""

    name: str
    ifindex: int
    kind: str  # "bridge", "veth", ... or "" for a plain device
    mac: str
    up: bool
    master: int  # ifindex of its bridge, 0 for none
    stp: bool  # a bridge running the kernel's STP


class Sockets:
    """The sockets of one namespace (nsfd, -1 for ours), made on first use; close() closes
    them all."""

    def __init__(self, nsfd: int = -1) -> None:
        self.nsfd = nsfd
        self._fds: Dict[str, int] = {}

    def _get(self, what: str, domain: int, kind: int, proto: int) -> int:
        fd = self._fds.get(what)
        if fd is None:
            fd = self._fds[what] = socket_in(self.nsfd, domain, kind, proto)
        return fd

    @property
    def netlink(self) -> int:
        """An rtnetlink socket."""
        return self._get("netlink", socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE

    @property
    def packet(self) -> int:
        """A raw packet socket, bound to nothing until a probe binds it (protocol 0: it
        receives nothing meanwhile)."""
        return self._get("packet", socket.AF_PACKET, socket.SOCK_RAW, 0)

    def icmp(self, version: int) -> int:
        """A raw ICMP (version 4) or ICMPv6 (6) socket."""
        if version == 4:
            return self._get("icmp4", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        return self._get("icmp6", socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)

    def close(self) -> None:
        """Close every socket made (idempotent)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> "Sockets":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- links -----------------------------------------------------------------------

    def link(self, name: str) -> Link:
        """The link `name`; FileNotFoundError-like OSError (ENODEV) if there is none."""
        ifindex, up, master, stp = (ffi.new("int *") for _ in range(4))
        kind = ffi.new("char[]", int(lib.PYCPT_NIC_KIND_LEN))
        mac = ffi.new("uint8_t[]", int(lib.PYCPT_NIC_MAC_LEN))
        check(
            lib.pycpt_nic_link_get(
                self.netlink, name.encode(), ifindex, kind, mac, up, master, stp
            ),
            f"link {name}",
        )
        return Link(
            name,
            int(ifindex[0]),
            ffi.string(kind).decode(errors="replace"),
            mac_text(bytes(ffi.buffer(mac))),
            bool(up[0]),
            int(master[0]),
            bool(stp[0]),
        )

    def find_link(self, name: str) -> Optional[Link]:
        """The link `name`, or None if there is none."""
        try:
            return self.link(name)
        except OSError as exc:
            if exc.errno == 19:  # ENODEV
                return None
            raise

    def veth_add(
        self,
        outside: str,
        inside: str,
        inside_nsfd: int,
        mac_in: Optional[str],
        mac_out: Optional[str],
        mtu: int = 0,
    ) -> int:
        """A veth pair, `outside` here and `inside` made in namespace inside_nsfd; returns
        the outside end's ifindex."""
        ifindex = ffi.new("int *")
        check(
            lib.pycpt_nic_veth_add(
                self.netlink,
                outside.encode(),
                inside.encode(),
                inside_nsfd,
                mac_bytes(mac_in) if mac_in else ffi.NULL,
                mac_bytes(mac_out) if mac_out else ffi.NULL,
                mtu,
                ifindex,
            ),
            f"veth pair {outside}/{inside}",
        )
        return int(ifindex[0])

    def link_set(
        self,
        ifindex: int,
        *,
        master: int = -1,
        up: int = -1,
        mac: Optional[str] = None,
        mtu: int = 0,
    ) -> None:
        """Set a link's bridge (0: none), admin state, MAC and MTU; what is not given
        stays."""
        check(
            lib.pycpt_nic_link_set(
                self.netlink, ifindex, master, up, mac_bytes(mac) if mac else ffi.NULL, mtu
            ),
            f"link {ifindex}",
        )

    def link_del(self, ifindex: int) -> None:
        """Delete a link (a veth end takes its peer with it)."""
        check(lib.pycpt_nic_link_del(self.netlink, ifindex), f"deleting link {ifindex}")

    def port_state(self, ifindex: int, state: int) -> None:
        """The bridge port's state (PORT_DISABLED holds every frame; PORT_FORWARDING)."""
        check(lib.pycpt_nic_port_state(self.netlink, ifindex, state), f"bridge port {ifindex}")

    # --- addresses and routes --------------------------------------------------------

    def addr_add(self, ifindex: int, iface: IPInterface) -> None:
        """Add an address (IPv6 without duplicate-address detection: probed already)."""
        check(
            lib.pycpt_nic_addr_add(
                self.netlink,
                ifindex,
                _family(iface.ip),
                iface.ip.packed,
                iface.network.prefixlen,
            ),
            f"address {iface}",
        )

    def addresses(self, ifindex: int = 0) -> List[IPInterface]:
        """The addresses of a link (0: of every link in the namespace)."""
        entry = int(lib.PYCPT_NIC_ADDR_ENTRY)
        cap = 64
        while True:
            buf = ffi.new("uint8_t[]", cap * entry)
            count = ffi.new("int *")
            check(lib.pycpt_nic_addr_list(self.netlink, ifindex, buf, cap, count), "addresses")
            if count[0] <= cap:
                break
            cap = int(count[0]) + 16
        raw = bytes(ffi.buffer(buf, int(count[0]) * entry))
        found: List[IPInterface] = []
        for i in range(int(count[0])):
            fam, prefix = raw[i * entry], raw[i * entry + 1]
            addr = raw[i * entry + 2 : i * entry + (6 if fam == socket.AF_INET else 18)]
            found.append(ipaddress.ip_interface((ipaddress.ip_address(addr), prefix)))
        return found

    def route_default(self, ifindex: int, gateway: IPAddress) -> None:
        """The default route of the gateway's family via it, out of ifindex."""
        check(
            lib.pycpt_nic_route_add_default(
                self.netlink, ifindex, _family(gateway), gateway.packed
            ),
            f"default route via {gateway}",
        )

    # --- frames ----------------------------------------------------------------------

    def probe(
        self,
        ifindex: int,
        mac: str,
        ip: IPAddress,
        *,
        probes: int = 2,
        timeout_ms: int = 100,
        ignore_mac: Optional[str] = None,
    ) -> Optional[str]:
        """The MAC of whoever claims `ip` on the segment behind ifindex, or None."""
        found = ffi.new("int *")
        owner = ffi.new("uint8_t[]", 6)
        probe = lib.pycpt_nic_probe4 if ip.version == 4 else lib.pycpt_nic_probe6
        check(
            probe(
                self.packet,
                ifindex,
                mac_bytes(mac),
                ip.packed,
                probes,
                timeout_ms,
                mac_bytes(ignore_mac) if ignore_mac else ffi.NULL,
                found,
                owner,
            ),
            f"probing {ip}",
        )
        return mac_text(bytes(ffi.buffer(owner))) if found[0] else None

    def announce(self, ifindex: int, mac: str, ip: IPAddress) -> None:
        """Gratuitous ARP (IPv4) or unsolicited neighbour advertisement (IPv6) for ip."""
        announce = lib.pycpt_nic_announce4 if ip.version == 4 else lib.pycpt_nic_announce6
        check(announce(self.packet, ifindex, mac_bytes(mac), ip.packed), f"announcing {ip}")

    def kick(self, peer: Tuple[IPAddress, int], local: Tuple[IPAddress, int], seq: int) -> None:
        """RFC 6069: tell the peer of a TCP connection (peer -> local) that its segment at
        `seq` (its snd_una) could not be delivered, so that it retransmits now."""
        kick = lib.pycpt_nic_kick4 if peer[0].version == 4 else lib.pycpt_nic_kick6
        check(
            kick(
                self.icmp(peer[0].version),
                peer[0].packed,
                peer[1],
                local[0].packed,
                local[1],
                seq & 0xFFFFFFFF,
            ),
            f"kicking {peer[0]}",
        )
