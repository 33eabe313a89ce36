"""Container NICs: a container's own address on a host bridge (`pycpt start --net`).

Each NIC is a veth pair. The inside end (eth0, eth1, ...) lives in the container's network
namespace with its addresses, MAC and default routes; the outside end is a port of an
existing host bridge (pycpt never makes or changes the bridge itself). All of it is made from
the host side before any process of the container exists, after every check has passed:

    Container.start("web", argv, net=["bridge=br0,ip=192.0.2.10/24,gw=192.0.2.1"])
    Container.start("web", argv, net=[NetSpec("br0", addresses=["192.0.2.10/24"])])

While the container is frozen or dumped its traffic is held at the bridge: the outside end's
bridge port is disabled, which drops every frame both ways (ARP and neighbour discovery
too) while the container's own link keeps its carrier, so nothing CRIU records changes and
peers see no RST or FIN. After a restore or a move pycpt attaches the outside end again,
announces the addresses (gratuitous ARP, unsolicited neighbour advertisement) so that
switches and peers learn the new port at once, and "kicks" every peer of an established TCP
connection (an ICMP unreachable quoting the peer's oldest unacknowledged byte: RFC 6069 makes
the peer undo one doubling of its retransmission timeout per message and retransmit at once),
which shortens what a client sees from its backed-off timer to about the frozen window.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from pycpt import errors
from pycpt._sys import nic as _nic

__all__ = [
    "MAX_NICS",
    "NetSpec",
    "Nic",
    "ipadd_spec",
    "specs_from",
]

MAX_NICS = 8
PROBE_MS = 100  # how long duplicate-address probes wait for an answer
KICKS = 4  # ICMP messages per connection: each undoes one doubling of the peer's timeout
ENV_BRIDGE = "PYCPT_BRIDGE"  # the bridge of `--ipadd` (vzctl's --ipadd has no bridge)
ENV_KICK = "PYCPT_NET_KICK"  # "0": no RFC 6069 kicks after a restore or a move

_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_HOST_NAME = re.compile(r"pc[0-9a-f]{10}[0-9]")  # host_name_for()'s: nothing else is deleted
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_KICK_STATES = ("ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2")  # states in which a peer may send

NetLike = Union["NetSpec", str]


def _ifname(value: str, what: str) -> str:
    if not isinstance(value, str) or not _IFNAME.fullmatch(value) or value in (".", ".."):
        raise errors.NetSpecError(
            f"{what} {value!r} is not an interface name (1-15 letters, digits, '_', '.', '-')"
        )
    return value


def _interface(text: str, need_version: Optional[int] = None) -> str:
    """A container's address ADDR/PREFIX, checked and normalised."""
    if not isinstance(text, str) or "/" not in text:
        raise errors.NetSpecError(f"address {text!r} needs its prefix: ADDR/PREFIX")
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError as exc:
        raise errors.NetSpecError(f"address {text!r} is malformed: {exc}") from None
    ip, net = iface.ip, iface.network
    if need_version and ip.version != need_version:
        raise errors.NetSpecError(f"{text!r} is not an IPv{need_version} address")
    if net.prefixlen == 0:
        raise errors.NetSpecError(f"address {text!r}: a /0 prefix makes every host on-link")
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local:
        raise errors.NetSpecError(
            f"address {text!r} cannot be a container's (unspecified, loopback, multicast or "
            "link-local)"
        )
    edges = (net.network_address, net.broadcast_address)
    if ip.version == 4 and net.prefixlen <= 30 and ip in edges:
        raise errors.NetSpecError(f"address {text!r} is its subnet's network or broadcast address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise errors.NetSpecError(f"address {text!r}: give IPv4 addresses as such")
    return str(iface)


def _mac(text: str, what: str = "mac") -> str:
    if not isinstance(text, str) or not _MAC.fullmatch(text):
        raise errors.NetSpecError(f"{what} {text!r} is not a MAC address (six hex pairs, ':')")
    raw = _nic.mac_bytes(text)
    if raw[0] & 1 or raw == bytes(6):
        raise errors.NetSpecError(f"{what} {text} is not a unicast address")
    return text.lower()


@dataclass(frozen=True)
class NetSpec:
    """One NIC asked for: `bridge` (an existing host bridge), `addresses` (ADDR/PREFIX, IPv4
    and IPv6), `gateways` (at most one per family, on-link: the default routes), `mac` (the
    container's MAC; random if None), `name` (inside; eth0, eth1, ... by position if None)
    and `mtu` (0: the default). `NetSpec.parse` reads the `--net` syntax."""

    bridge: str
    addresses: Tuple[str, ...] = ()
    gateways: Tuple[str, ...] = ()
    mac: Optional[str] = None
    name: Optional[str] = None
    mtu: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # frozen: normalised once, here

        _ifname(self.bridge, "bridge")
        if isinstance(self.addresses, str) or isinstance(self.gateways, str):
            raise errors.NetSpecError("addresses and gateways are sequences of strings")
        addresses = tuple(_interface(a) for a in self.addresses)
        if not addresses:
            raise errors.NetSpecError(f"a NIC on {self.bridge} needs at least one ip=ADDR/PREFIX")
        if len({ipaddress.ip_interface(a).ip for a in addresses}) != len(addresses):
            raise errors.NetSpecError(f"an address is given twice: {', '.join(addresses)}")
        put("addresses", addresses)
        gateways = []
        for gw in self.gateways:
            try:
                ip = ipaddress.ip_address(str(gw).strip())
            except ValueError:
                raise errors.NetSpecError(f"gateway {gw!r} is not an address") from None
            nets = [
                ipaddress.ip_interface(a).network
                for a in addresses
                if ipaddress.ip_interface(a).version == ip.version
            ]
            if not nets:
                raise errors.NetSpecError(f"gateway {ip} has no IPv{ip.version} address beside it")
            if not (ip.version == 6 and ip.is_link_local) and not any(ip in n for n in nets):
                raise errors.NetSpecError(
                    f"gateway {ip} is not on-link: it lies outside "
                    + ", ".join(str(n) for n in nets)
                )
            if ip in [ipaddress.ip_interface(a).ip for a in addresses]:
                raise errors.NetSpecError(f"gateway {ip} is the container's own address")
            gateways.append(ip)
        if len({g.version for g in gateways}) != len(gateways):
            raise errors.NetSpecError("at most one gateway per address family (one default route)")
        put("gateways", tuple(str(g) for g in gateways))
        if self.mac is not None:
            put("mac", _mac(self.mac))
        if self.name is not None:
            _ifname(self.name, "name")
            if self.name == "lo":
                raise errors.NetSpecError("name lo is the container's loopback")
        if not isinstance(self.mtu, int) or not (self.mtu == 0 or 68 <= self.mtu <= 65535):
            raise errors.NetSpecError(f"mtu {self.mtu!r} is not between 68 and 65535")

    @classmethod
    def parse(cls, text: str) -> "NetSpec":
        """`bridge=BR,ip=ADDR/PREFIX[,ip=...][,ip6=ADDR/PREFIX][,gw=GW][,gw6=GW][,mac=MAC]
        [,name=IFNAME][,mtu=N]`: keys may repeat where a list makes sense (ip, ip6)."""
        if not isinstance(text, str) or not text.strip():
            raise errors.NetSpecError("an empty --net")
        fields: Dict[str, Any] = {"addresses": [], "gateways": []}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep or not value:
                raise errors.NetSpecError(f"--net {text!r}: {part!r} is not KEY=VALUE")
            if key in ("ip", "ip4", "ip6", "addr"):
                fields["addresses"].append(_interface(value, 6 if key == "ip6" else None))
                if key == "ip4" and ipaddress.ip_interface(value).version != 4:
                    raise errors.NetSpecError(f"{value!r} is not an IPv4 address")
            elif key in ("gw", "gw4", "gw6", "gateway"):
                version = {"gw4": 4, "gw6": 6}.get(key)
                try:
                    ip = ipaddress.ip_address(value)
                except ValueError:
                    raise errors.NetSpecError(f"gateway {value!r} is not an address") from None
                if version and ip.version != version:
                    raise errors.NetSpecError(f"{key}={value}: not an IPv{version} address")
                fields["gateways"].append(str(ip))
            elif key in ("bridge", "br", "mac", "name"):
                key = "bridge" if key == "br" else key
                if key in fields:
                    raise errors.NetSpecError(f"--net {text!r}: {key} given twice")
                fields[key] = value
            elif key == "mtu":
                try:
                    fields["mtu"] = int(value)
                except ValueError:
                    raise errors.NetSpecError(f"mtu {value!r} is not a number") from None
            else:
                raise errors.NetSpecError(f"--net {text!r}: unknown key {key!r}")
        if "bridge" not in fields:
            raise errors.NetSpecError(f"--net {text!r} names no bridge=BR")
        fields["addresses"] = tuple(fields["addresses"])
        fields["gateways"] = tuple(fields["gateways"])
        return cls(**fields)

    def __str__(self) -> str:
        parts = [f"bridge={self.bridge}", *(f"ip={a}" for a in self.addresses)]
        parts += [f"gw={g}" for g in self.gateways]
        if self.mac:
            parts.append(f"mac={self.mac}")
        if self.name:
            parts.append(f"name={self.name}")
        if self.mtu:
            parts.append(f"mtu={self.mtu}")
        return ",".join(parts)


def specs_from(net: Union[None, NetLike, Sequence[NetLike]]) -> List[NetSpec]:
    """NetSpecs from what Container.start's `net` takes (a NetSpec, a `--net` string or a
    sequence of either), checked together: names, addresses and default routes unique."""
    if net is None:
        return []
    items = [net] if isinstance(net, (str, NetSpec)) else list(net)
    specs = [item if isinstance(item, NetSpec) else NetSpec.parse(item) for item in items]
    if len(specs) > MAX_NICS:
        raise errors.NetSpecError(f"at most {MAX_NICS} NICs per container, not {len(specs)}")
    names = [s.name or f"eth{i}" for i, s in enumerate(specs)]
    if len(set(names)) != len(names):
        raise errors.NetSpecError(f"two NICs with the same name: {', '.join(names)}")
    seen: Dict[Any, str] = {}
    for name, spec in zip(names, specs, strict=True):
        for a in spec.addresses:
            ip = ipaddress.ip_interface(a).ip
            if ip in seen:
                raise errors.NetSpecError(f"address {ip} is given to both {seen[ip]} and {name}")
            seen[ip] = name
    families = [ipaddress.ip_address(g).version for s in specs for g in s.gateways]
    if len(set(families)) != len(families):
        raise errors.NetSpecError("at most one gateway per address family over all NICs")
    macs = [s.mac for s in specs if s.mac]
    if len(set(macs)) != len(macs):
        raise errors.NetSpecError("two NICs with the same MAC")
    return specs


def ipadd_spec(addresses: Sequence[str], bridge: Optional[str] = None) -> NetSpec:
    """vzctl's `--ipadd ADDR` (repeatable) as one NIC on `bridge` (default $PYCPT_BRIDGE). An
    address without /PREFIX takes the prefix of the bridge's own address in its subnet."""
    bridge = bridge or os.environ.get(ENV_BRIDGE)
    if not bridge:
        raise errors.NetSpecError(
            "--ipadd needs a bridge: set PYCPT_BRIDGE (or use --net bridge=BR,ip=ADDR/PREFIX)"
        )
    _ifname(bridge, "bridge")
    own: List[Any] = []
    done = []
    for text in addresses:
        if "/" not in text:
            if not own:
                with _nic.Sockets() as host:
                    link = _bridge(host, bridge, "")
                    own = host.addresses(link.ifindex)
            try:
                ip = ipaddress.ip_address(text.strip())
            except ValueError:
                raise errors.NetSpecError(f"--ipadd {text!r} is not an address") from None
            match = [i for i in own if i.version == ip.version and ip in i.network]
            if not match:
                raise errors.NetSpecError(
                    f"--ipadd {text}: bridge {bridge} has no address in its subnet to take the "
                    "prefix from; give ADDR/PREFIX"
                )
            text = f"{ip}/{match[0].network.prefixlen}"
        done.append(text)
    return NetSpec(bridge, addresses=tuple(done))


# --- what pycpt records ------------------------------------------------------------------


@dataclass
class Nic:
    """One NIC as recorded in a container's state and its dump file's config (`nics`):
    `name`/`mac` inside, `bridge`, the outside end `host_name`/`host_mac` on this host, the
    `addresses` (ADDR/PREFIX), `gateways` and `mtu`."""

    name: str
    mac: str
    bridge: str
    host_name: str
    host_mac: str
    addresses: List[str] = field(default_factory=list)
    gateways: List[str] = field(default_factory=list)
    mtu: int = 0

    def to_dict(self) -> Dict[str, Any]:
        """The record written to state.json and the dump file's config."""
        return {
            "name": self.name,
            "mac": self.mac,
            "bridge": self.bridge,
            "host_name": self.host_name,
            "host_mac": self.host_mac,
            "addresses": list(self.addresses),
            "gateways": list(self.gateways),
            "mtu": self.mtu,
        }

    @property
    def ips(self) -> List[Any]:
        """The addresses without their prefixes (ipaddress objects)."""
        return [ipaddress.ip_interface(a).ip for a in self.addresses]

    def __str__(self) -> str:
        return f"{self.name} {' '.join(self.addresses)} on {self.bridge} ({self.mac})"


def host_name_for(key: str, index: int) -> str:
    """The outside end's name on this host: 'pc', 10 hex digits of a hash of `key` (the
    state directory and the container id) and the NIC's index: 13 characters, under
    IFNAMSIZ, the same at every restore here."""
    return f"pc{hashlib.sha256(key.encode()).hexdigest()[:10]}{index}"


def _random_mac(first: int) -> str:
    return _nic.mac_text(bytes([first]) + os.urandom(5))


def plan(specs: Sequence[NetSpec], key: str) -> List[Nic]:
    """The records of new NICs: inside names by position, a random locally administered MAC
    (02:...) unless given, the outside end's name from `key` and its MAC fe:... (the
    highest first octet: a bridge without a fixed MAC of its own takes its ports' lowest,
    never this one)."""
    return [
        Nic(
            name=spec.name or f"eth{i}",
            mac=spec.mac or _random_mac(0x02),
            bridge=spec.bridge,
            host_name=host_name_for(key, i),
            host_mac=_random_mac(0xFE),
            addresses=list(spec.addresses),
            gateways=list(spec.gateways),
            mtu=spec.mtu,
        )
        for i, spec in enumerate(specs)
    ]


def from_records(records: Any, key: Optional[str] = None) -> List[Nic]:
    """NICs from recorded `nics` (a state file, a dump file's config, a migration message:
    untrusted), every field checked as NetSpec checks it. With `key` the outside ends are
    named for this host (a restore or a migration), else the recorded names are kept."""
    if records is None:
        return []
    if not isinstance(records, list) or len(records) > MAX_NICS:
        raise errors.NetSpecError(f"recorded nics must be a list of at most {MAX_NICS}")
    nics = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise errors.NetSpecError("a recorded NIC is not a mapping")
        for listed in ("addresses", "gateways"):
            value = rec.get(listed) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise errors.NetSpecError(f"recorded {listed} must be sequences of strings")
        try:
            spec = NetSpec(
                rec["bridge"],
                addresses=tuple(rec.get("addresses") or ()),
                gateways=tuple(rec.get("gateways") or ()),
                mac=rec["mac"],
                name=rec["name"],
                mtu=rec.get("mtu") or 0,
            )
        except (KeyError, TypeError) as exc:
            raise errors.NetSpecError(f"a recorded NIC lacks or mangles {exc}") from None
        host_name = host_name_for(key, i) if key else str(rec.get("host_name"))
        if not _HOST_NAME.fullmatch(host_name):
            raise errors.NetSpecError(f"recorded host_name {host_name!r} is not one of pycpt's")
        host_mac = rec.get("host_mac")
        nics.append(
            Nic(
                name=spec.name or f"eth{i}",
                mac=spec.mac or "",
                bridge=spec.bridge,
                host_name=host_name,
                host_mac=_mac(host_mac, "host_mac") if host_mac else _random_mac(0xFE),
                addresses=list(spec.addresses),
                gateways=list(spec.gateways),
                mtu=spec.mtu,
            )
        )
    specs_from(
        [NetSpec(n.bridge, tuple(n.addresses), tuple(n.gateways), n.mac, n.name) for n in nics]
    )  # the checks across NICs
    return nics


def records(nics: Iterable[Nic]) -> List[Dict[str, Any]]:
    """[Nic.to_dict(), ...]"""
    return [n.to_dict() for n in nics]


def nics_of(state: Dict[str, Any]) -> List[Nic]:
    """The NICs a container's state records (its own state file: names kept)."""
    return from_records(state.get("nics") or None)


def addresses_of(state: Dict[str, Any]) -> List[str]:
    """Every address of a container's NICs as recorded (for `pycpt list`), unchecked."""
    found = []
    for rec in state.get("nics") or []:
        if isinstance(rec, dict):
            found += [str(a) for a in rec.get("addresses") or [] if isinstance(a, str)]
    return found


# --- checks before anything is made ---------------------------------------------------------


def _bridge(host: _nic.Sockets, name: str, nic: str) -> _nic.Link:
    """The host bridge `name`, checked: it exists, is a bridge, is up and runs no STP."""
    link = host.find_link(name)
    make = f"make it with `ip link add {name} type bridge && ip link set {name} up`"
    if link is None:
        raise errors.BridgeError(
            f"there is no bridge {name} on this host", bridge=name, nic=nic, hint=make
        )
    if link.kind != "bridge":
        raise errors.BridgeError(
            f"{name} is a {link.kind or 'plain'} link, not a bridge",
            bridge=name,
            nic=nic,
            hint="name an existing bridge (`ip -br link show type bridge` lists them)",
        )
    if not link.up:
        raise errors.BridgeError(
            f"bridge {name} is down", bridge=name, nic=nic, hint=f"`ip link set {name} up`"
        )
    if link.stp:
        raise errors.BridgeError(
            f"bridge {name} runs the kernel's STP, which owns its ports' states (pycpt holds "
            "a container's traffic by its port's state)",
            bridge=name,
            nic=nic,
            hint=f"`ip link set {name} type bridge stp_state 0`",
        )
    return link


def preflight(
    nics: Sequence[Nic],
    *,
    taken: Optional[Dict[str, str]] = None,
    moving: bool = False,
    probe_ms: int = PROBE_MS,
) -> Dict[str, Any]:
    """Every check before a NIC is made here (start, restore, a migration's target): each
    bridge exists, is a bridge, is up and runs no STP; each outside name is free; no address
    is this host's own, in `taken` ({address: owner}, other pycpt containers here), or
    answered for on its bridge's segment (duplicate-address probes, all at once). `moving`:
    the container's own MAC answering does not count (it still runs at the source).
    Returns what was found, for a dry run's report; raises a NicError subclass."""
    report: Dict[str, Any] = {"bridges": {}, "addresses": {}}
    if not nics:
        return report
    with _nic.Sockets() as host:
        bridges = {}
        for n in nics:
            bridges[n.bridge] = link = _bridge(host, n.bridge, n.name)
            report["bridges"][n.bridge] = {"mac": link.mac, "up": link.up}
            if host.find_link(n.host_name) is not None:
                raise errors.NicError(
                    f"a link named {n.host_name} exists on this host already (the outside end "
                    f"of {n.name} would take that name)",
                    nic=n.name,
                    hint=f"if it is left over from this container, `ip link del {n.host_name}`",
                )
        own = {i.ip for i in host.addresses()}
    for n in nics:
        for ip in n.ips:
            owner = (taken or {}).get(str(ip))
            if ip in own:
                owner = "this host"
            if owner:
                raise errors.AddressInUseError(
                    f"address {ip} of {n.name} is in use by {owner}",
                    address=str(ip),
                    owner=owner,
                    bridge=n.bridge,
                )
    found = _probe_all(nics, bridges, probe_ms, moving)
    for n in nics:
        for ip in n.ips:
            owner = found.get(str(ip))
            if isinstance(owner, BaseException):
                raise errors.NicError(
                    f"probing address {ip} on {n.bridge} failed: {owner}", nic=n.name
                ) from owner
            if owner:
                raise errors.AddressInUseError(
                    f"address {ip} of {n.name} is in use on {n.bridge}'s segment by {owner}",
                    address=str(ip),
                    owner=str(owner),
                    bridge=n.bridge,
                )
            report["addresses"][str(ip)] = {"bridge": n.bridge, "free": True}
    return report


def preload() -> None:
    """Import what reading the kicks from a checkpoint's images needs (pycpt.images and its
    schema: 100-200 ms), ahead of a restore whose time counts."""
    import pycpt.images  # noqa: F401


def _probe_all(
    nics: Sequence[Nic], bridges: Dict[str, _nic.Link], probe_ms: int, moving: bool
) -> Dict[str, Any]:
    """Probe every address at once (a thread each, the C call releases the GIL): the wait
    is one probe window, not one per address."""
    found: Dict[str, Any] = {}

    def one(n: Nic, ip: Any) -> None:
        br = bridges[n.bridge]
        try:
            with _nic.Sockets() as host:
                found[str(ip)] = host.probe(
                    br.ifindex,
                    br.mac,
                    ip,
                    timeout_ms=probe_ms,
                    ignore_mac=n.mac if moving else None,
                )
        except OSError as exc:
            found[str(ip)] = exc

    threads = [
        threading.Thread(target=one, args=(n, ip), name=f"pycpt-probe-{ip}")
        for n in nics
        for ip in n.ips
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return found


# --- making, holding, moving, removing ---------------------------------------------------------


def _failed(what: str, n: Nic, exc: OSError) -> errors.NicError:
    return errors.NicError(f"{what} of {n.name} ({n.host_name}) failed: {exc.strerror}", nic=n.name)


def make_netns(nics: Sequence[Nic]) -> int:
    """A new network namespace with loopback up and every NIC made and wired: the veth pair,
    the outside end on its bridge (forwarding), the inside end with its MAC, addresses and
    default routes. Returns its descriptor (the container joins it at spawn); on failure
    nothing of it is left."""
    nsfd = _nic.netns_new()
    made: List[int] = []
    try:
        with _nic.Sockets() as host, _nic.Sockets(nsfd) as inside:
            inside.link_set(inside.link("lo").ifindex, up=1)
            for n in nics:
                bridge = _bridge(host, n.bridge, n.name)
                try:
                    out = host.veth_add(n.host_name, n.name, nsfd, n.mac, n.host_mac, n.mtu)
                except OSError as exc:
                    raise _failed("making the veth pair", n, exc) from exc
                made.append(out)
                try:
                    # a port of a bridge without STP forwards once it has a carrier
                    host.link_set(out, master=bridge.ifindex, up=1)
                    eth = inside.link(n.name).ifindex
                    for a in n.addresses:
                        inside.addr_add(eth, ipaddress.ip_interface(a))
                    inside.link_set(eth, up=1)
                    for g in n.gateways:
                        inside.route_default(eth, ipaddress.ip_address(g))
                except OSError as exc:
                    raise _failed("wiring", n, exc) from exc
    except BaseException:
        _delete(made)
        os.close(nsfd)
        raise
    return nsfd


def _delete(ifindexes: Sequence[int]) -> None:
    with _nic.Sockets() as host:
        for ifindex in ifindexes:
            try:
                host.link_del(ifindex)
            except OSError:
                pass  # gone with its namespace already


def _outsides(
    host: _nic.Sockets, nics: Sequence[Nic], what: str
) -> Iterator[Tuple[Nic, _nic.Link]]:
    """Each NIC with its outside end here; a NicError if one is gone."""
    for n in nics:
        link = host.find_link(n.host_name)
        if link is None:
            raise errors.NicError(
                f"{what} of {n.name}: its outside end {n.host_name} is gone", nic=n.name
            )
        yield n, link


def hold(nics: Sequence[Nic]) -> None:
    """Hold every frame to and from the container: its bridge ports disabled (a frozen or
    dumped container then neither answers ARP nor sends anything; its links stay up)."""
    if not nics:
        return
    with _nic.Sockets() as host:
        for n, link in _outsides(host, nics, "holding the traffic"):
            try:
                _port(host, link.ifindex, _nic.PORT_DISABLED)
            except OSError as exc:
                raise _failed("holding the traffic", n, exc) from exc


def _port(host: _nic.Sockets, ifindex: int, state: int) -> None:
    try:
        host.port_state(ifindex, state)
    except OSError as exc:
        # ENETDOWN: the container took its own link down; the bridge makes the port forward
        # by itself once the link has a carrier again
        if not (exc.errno == errno.ENETDOWN and state == _nic.PORT_FORWARDING):
            raise


def attach(nics: Sequence[Nic]) -> None:
    """Put each outside end on its bridge, up and forwarding, with its MAC. After a restore
    CRIU has rebuilt the veth pair with the outside end down and on no bridge (so nothing
    reached the wire before pycpt said so); after a suspension the port only forwards
    again. Whatever is already as it should be is left alone."""
    if not nics:
        return
    with _nic.Sockets() as host:
        for n, link in _outsides(host, nics, "attaching"):
            bridge = _bridge(host, n.bridge, n.name)
            try:
                if link.mac != n.host_mac:
                    host.link_set(link.ifindex, mac=n.host_mac)
                if link.master != bridge.ifindex or not link.up:
                    # CRIU's rebuilt outside end has the default MTU: it gets the NIC's
                    host.link_set(link.ifindex, master=bridge.ifindex, up=1, mtu=n.mtu)
                _port(host, link.ifindex, _nic.PORT_FORWARDING)
            except OSError as exc:
                raise _failed("attaching", n, exc) from exc


release = attach  # after a suspension: the ports forward again


def bring_up(pid: int, nics: Sequence[Nic], kicks: Optional[Sequence[Any]] = None) -> None:
    """Let a container's traffic flow (after a suspension, a restore or a move): attach its
    outside ends, announce its addresses and kick the peers of its TCP connections (`kicks`,
    from kicks_from). The kernel answers for a frozen container, so this runs before the
    thaw: the first retransmission a kick provokes is acknowledged at once."""
    attach(nics)
    announce(pid, nics)
    kick(pid, kicks or ())


def remove(nics: Sequence[Nic]) -> None:
    """Delete every outside end (its peer goes with it). Needed before a frozen container
    is killed: its orphaned sockets would keep the namespace, and so the veth, for a minute
    (and their retries could reach the wire). Gone already is fine."""
    if not nics:
        return
    with _nic.Sockets() as host:
        for n in nics:
            link = host.find_link(n.host_name)
            if link is None:
                continue
            try:
                host.link_del(link.ifindex)
            except OSError as exc:
                if exc.errno != errno.ENODEV:
                    raise _failed("removing", n, exc) from exc


def announce(pid: int, nics: Sequence[Nic]) -> None:
    """Gratuitous ARP and unsolicited neighbour advertisements for every address, sent from
    the container's own link: switches learn its port, peers its MAC."""
    if not nics:
        return
    nsfd = _nic.open_netns(pid)
    try:
        with _nic.Sockets(nsfd) as inside:
            for n in nics:
                try:
                    eth = inside.link(n.name)
                    for ip in n.ips:
                        inside.announce(eth.ifindex, n.mac, ip)
                except OSError as exc:
                    raise _failed("announcing the addresses", n, exc) from exc
    finally:
        os.close(nsfd)


# --- the kick ------------------------------------------------------------------------------

Kick = Tuple[str, int, str, int, int]  # peer address, peer port, local address, port, seq


def _endpoint(text: str) -> Tuple[Any, int]:
    host, _, port = text.rpartition(":")
    return ipaddress.ip_address(host.strip("[]")), int(port)


def kicks_from(images: Any, nics: Sequence[Nic]) -> List[Kick]:
    """The connections whose peers to kick after a restore, from the checkpoint's images (a
    pycpt.images.Images): every TCP socket on one of the NICs' addresses that was
    established (or half-closed by us) with its peer's oldest unacknowledged byte (our
    rcv_nxt, CRIU's inq_seq)."""
    ours = {ip for n in nics for ip in n.ips}
    kicks: List[Kick] = []
    for sock in images.sockets():
        if sock.protocol != "tcp" or sock.state not in _KICK_STATES or not sock.peer:
            continue
        try:
            local, peer = _endpoint(sock.local or ""), _endpoint(sock.peer)
        except ValueError:
            continue
        if local[0] not in ours or local[0].version != peer[0].version:
            continue
        stream = images.get(f"tcp-stream-{sock.ino:x}.img")
        if stream is None:
            continue
        seq = int(stream.first().inq_seq)
        kicks.append((str(peer[0]), peer[1], str(local[0]), local[1], seq))
    return kicks


def kick(pid: int, kicks: Sequence[Sequence[Any]]) -> int:
    """Send the RFC 6069 kicks (`kicks_from`) from the container's namespace; returns how many
    connections were kicked. Best effort: a peer that is gone is not an error. Off with
    PYCPT_NET_KICK=0 (where ICMP errors toward the peers are unwelcome)."""
    if not kicks or os.environ.get(ENV_KICK) == "0":
        return 0
    nsfd = _nic.open_netns(pid)
    done = 0
    try:
        with _nic.Sockets(nsfd) as inside:
            for peer, pport, local, lport, seq in kicks:
                try:
                    p, l_ = ipaddress.ip_address(peer), ipaddress.ip_address(local)
                    for _ in range(KICKS):
                        inside.kick((p, int(pport)), (l_, int(lport)), int(seq))
                    done += 1
                except (OSError, ValueError):
                    continue
    finally:
        os.close(nsfd)
    return done


# --- CRIU ----------------------------------------------------------------------------------


def criu_veths(nics: Sequence[Nic]) -> List[Dict[str, str]]:
    """CRIU's RPC `veths` for a restore: each inside end's peer made as the outside end here,
    on no bridge (pycpt attaches it when the container may run)."""
    return [{"if_in": n.name, "if_out": n.host_name} for n in nics]


def criu_args(nics: Sequence[Nic]) -> List[str]:
    """The same as `criu restore` arguments (the streamed restore runs CRIU's command)."""
    return [f"--external=veth[{n.name}]:{n.host_name}" for n in nics]
