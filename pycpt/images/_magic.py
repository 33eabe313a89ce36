"""What each CRIU image file is: its name, its magic numbers and how its entries are laid out.

Facts from CRIU >= 4.2 (criu/include/magic.h, criu/image-desc.c, criu/image.c). An image
file starts with two little-endian u32 magics: IMG_COMMON (or IMG_SERVICE for the service
files stats-* and irmap-cache), then the magic of its kind; inventory.img has only its own.
Raw images (pages, ip tool and nftables dumps, tarballs) have no magic at all. After the
magics come entries, each a u32 size and a protobuf message of that size, some followed by
a payload whose length the message gives (the `extra` rules below).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

IMG_COMMON = 0x54564319
IMG_SERVICE = 0x55105940

# kind -> magic, as CRIU names them (magic.h without the _MAGIC suffix)
MAGICS: Dict[str, int] = {
    "INVENTORY": 0x58313116,
    "PSTREE": 0x50273030,
    "FDINFO": 0x56213732,
    "PAGEMAP": 0x56084025,
    "CORE": 0x55053847,
    "IDS": 0x54432030,
    "VMAS": 0x54123737,
    "PIPES": 0x56513555,
    "PIPES_DATA": 0x56453709,
    "FIFO": 0x58364939,
    "FIFO_DATA": 0x59333054,
    "SIGACT": 0x55344201,
    "UNIXSK": 0x54373943,
    "INETSK": 0x56443851,
    "PACKETSK": 0x60454618,
    "ITIMERS": 0x57464056,
    "POSIX_TIMERS": 0x52603957,
    "SK_QUEUES": 0x56264026,
    "UTSNS": 0x54473203,
    "CREDS": 0x54023547,
    "IPC_VAR": 0x53115007,
    "IPCNS_SHM": 0x46283044,
    "IPCNS_MSG": 0x55453737,
    "IPCNS_SEM": 0x59573019,
    "REG_FILES": 0x50363636,
    "EXT_FILES": 0x59255641,
    "FS": 0x51403912,
    "MM": 0x57492820,
    "REMAP_FPATH": 0x59133954,
    "GHOST_FILE": 0x52583605,
    "TCP_STREAM": 0x51465506,
    "EVENTFD_FILE": 0x44523722,
    "EVENTPOLL_FILE": 0x45023858,
    "EVENTPOLL_TFD": 0x44433746,
    "SIGNALFD": 0x57323820,
    "INOTIFY_FILE": 0x48424431,
    "INOTIFY_WD": 0x54562009,
    "MNTS": 0x55563928,
    "NETDEV": 0x57373951,
    "NETNS": 0x55933752,
    "TTY_FILES": 0x59433025,
    "TTY_INFO": 0x59453036,
    "TTY_DATA": 0x59413026,
    "FILE_LOCKS": 0x54323616,
    "RLIMIT": 0x57113925,
    "FANOTIFY_FILE": 0x55096122,
    "FANOTIFY_MARK": 0x56506035,
    "SIGNAL": 0x59255647,
    "NETLINK_SK": 0x58005614,
    "NS_FILES": 0x61394011,
    "TUNFILE": 0x57143751,
    "CGROUP": 0x59383330,
    "TIMERFD": 0x50493712,
    "CPUINFO": 0x61404013,
    "USERNS": 0x55474906,
    "SECCOMP": 0x64413049,
    "BINFMT_MISC": 0x67343323,
    "AUTOFS": 0x49353943,
    "FILES": 0x56303138,
    "MEMFD_INODE": 0x48453499,
    "TIMENS": 0x43114433,
    "PIDNS": 0x61157326,
    "BPFMAP_FILE": 0x57506142,
    "BPFMAP_DATA": 0x64324033,
    "APPARMOR": 0x59423047,
    "PIDFD": 0x54435556,
    "STATS": 0x57093306,
    "IRMAP_CACHE": 0x57004059,
}
BY_MAGIC: Dict[int, str] = {v: k for k, v in MAGICS.items()}

# Layouts: "entries" (size + message, repeated), "pagemap" (a pagemap_head first, then
# pagemap_entry), "extra" (each message followed by a payload, see EXTRA), "ghost" (see
# _reader), "ipc_msg" (each queue followed by its messages), "raw" (no magic, no entries).


@dataclass(frozen=True)
class Kind:
    """One kind of image file."""

    name: str
    message: Optional[str]  # the entry message; None for raw images
    layout: str = "entries"
    service: bool = False

    @property
    def magic(self) -> Optional[int]:
        return MAGICS.get(self.name)

    @property
    def head_magic(self) -> Optional[int]:
        if self.layout == "raw" or self.name == "INVENTORY":
            return None
        return IMG_SERVICE if self.service else IMG_COMMON


def _k(name: str, message: Optional[str], layout: str = "entries", service: bool = False) -> Kind:
    return Kind(name, message, layout, service)


# (file name pattern, kind); N is a decimal number, X a hexadecimal one, S a word
_PATTERNS: List[Tuple[str, Kind]] = [
    ("inventory", _k("INVENTORY", "inventory_entry")),
    ("pstree", _k("PSTREE", "pstree_entry")),
    ("core-N", _k("CORE", "core_entry")),
    ("ids-N", _k("IDS", "task_kobj_ids_entry")),
    ("mm-N", _k("MM", "mm_entry")),
    ("vmas-N", _k("VMAS", "vma_entry")),
    ("pagemap-N", _k("PAGEMAP", "pagemap_entry", "pagemap")),
    ("pagemap-shmem-N", _k("PAGEMAP", "pagemap_entry", "pagemap")),
    ("pages-N", _k("PAGES", None, "raw")),
    ("fdinfo-N", _k("FDINFO", "fdinfo_entry")),
    ("files", _k("FILES", "file_entry")),
    ("fs-N", _k("FS", "fs_entry")),
    ("reg-files", _k("REG_FILES", "reg_file_entry")),
    ("ext-files", _k("EXT_FILES", "ext_file_entry")),
    ("ns-files", _k("NS_FILES", "ns_file_entry")),
    ("eventfd", _k("EVENTFD_FILE", "eventfd_file_entry")),
    ("eventpoll", _k("EVENTPOLL_FILE", "eventpoll_file_entry")),
    ("eventpoll-tfd", _k("EVENTPOLL_TFD", "eventpoll_tfd_entry")),
    ("signalfd", _k("SIGNALFD", "signalfd_entry")),
    ("inotify", _k("INOTIFY_FILE", "inotify_file_entry")),
    ("inotify-wd", _k("INOTIFY_WD", "inotify_wd_entry")),
    ("fanotify", _k("FANOTIFY_FILE", "fanotify_file_entry")),
    ("fanotify-mark", _k("FANOTIFY_MARK", "fanotify_mark_entry")),
    ("pipes", _k("PIPES", "pipe_entry")),
    ("pipes-data", _k("PIPES_DATA", "pipe_data_entry", "extra")),
    ("fifo", _k("FIFO", "fifo_entry")),
    ("fifo-data", _k("FIFO_DATA", "pipe_data_entry", "extra")),
    ("sigacts-N", _k("SIGACT", "sa_entry")),
    ("unixsk", _k("UNIXSK", "unix_sk_entry")),
    ("inetsk", _k("INETSK", "inet_sk_entry")),
    ("packetsk", _k("PACKETSK", "packet_sock_entry")),
    ("netlinksk", _k("NETLINK_SK", "netlink_sk_entry")),
    ("sk-queues", _k("SK_QUEUES", "sk_packet_entry", "extra")),
    ("itimers-N", _k("ITIMERS", "itimer_entry")),
    ("posix-timers-N", _k("POSIX_TIMERS", "posix_timer_entry")),
    ("creds-N", _k("CREDS", "creds_entry")),
    ("utsns-N", _k("UTSNS", "utsns_entry")),
    ("ipcns-var-N", _k("IPC_VAR", "ipc_var_entry")),
    ("ipcns-shm-N", _k("IPCNS_SHM", "ipc_shm_entry", "extra")),
    ("ipcns-msg-N", _k("IPCNS_MSG", "ipc_msg_entry", "ipc_msg")),
    ("ipcns-sem-N", _k("IPCNS_SEM", "ipc_sem_entry", "extra")),
    ("remap-fpath", _k("REMAP_FPATH", "remap_file_path_entry")),
    ("ghost-file-X", _k("GHOST_FILE", "ghost_file_entry", "ghost")),
    ("memfd", _k("MEMFD_INODE", "memfd_inode_entry")),
    ("tcp-stream-X", _k("TCP_STREAM", "tcp_stream_entry", "extra")),
    ("mountpoints-N", _k("MNTS", "mnt_entry")),
    ("netdev-N", _k("NETDEV", "net_device_entry")),
    ("netns-N", _k("NETNS", "netns_entry")),
    ("ifaddr-N", _k("IFADDR", None, "raw")),
    ("route-N", _k("ROUTE", None, "raw")),
    ("route6-N", _k("ROUTE6", None, "raw")),
    ("rule-N", _k("RULE", None, "raw")),
    ("iptables-N", _k("IPTABLES", None, "raw")),
    ("ip6tables-N", _k("IP6TABLES", None, "raw")),
    ("nftables-N", _k("NFTABLES", None, "raw")),
    ("netns-ct-N", _k("NETNF_CT", None, "raw")),
    ("netns-exp-N", _k("NETNF_EXP", None, "raw")),
    ("tmpfs-N.tar.gz", _k("TMPFS_IMG", None, "raw")),
    ("tmpfs-dev-N.tar.gz", _k("TMPFS_DEV", None, "raw")),
    ("autofs-N", _k("AUTOFS", "autofs_entry")),
    ("binfmt-misc", _k("BINFMT_MISC", "binfmt_misc_entry")),
    ("binfmt-misc-N", _k("BINFMT_MISC", "binfmt_misc_entry")),
    ("tty", _k("TTY_FILES", "tty_file_entry")),
    ("tty-info", _k("TTY_INFO", "tty_info_entry")),
    ("tty-data", _k("TTY_DATA", "tty_data_entry")),
    ("filelocks", _k("FILE_LOCKS", "file_lock_entry")),
    ("rlimit-N", _k("RLIMIT", "rlimit_entry")),
    ("signal-s-N", _k("SIGNAL", "siginfo_entry")),
    ("signal-p-N", _k("SIGNAL", "siginfo_entry")),
    ("tunfile", _k("TUNFILE", "tunfile_entry")),
    ("cgroup", _k("CGROUP", "cgroup_entry")),
    ("timerfd", _k("TIMERFD", "timerfd_entry")),
    ("cpuinfo", _k("CPUINFO", "cpuinfo_entry")),
    ("seccomp", _k("SECCOMP", "seccomp_entry")),
    ("userns-N", _k("USERNS", "userns_entry")),
    ("timens-N", _k("TIMENS", "timens_entry")),
    ("pidns-N", _k("PIDNS", "pidns_entry")),
    ("bpfmap-file", _k("BPFMAP_FILE", "bpfmap_file_entry")),
    ("bpfmap-data", _k("BPFMAP_DATA", "bpfmap_data_entry", "extra")),
    ("apparmor", _k("APPARMOR", "apparmor_entry")),
    ("pidfd", _k("PIDFD", "pidfd_entry")),
    ("stats-S", _k("STATS", "stats_entry", service=True)),
    ("irmap-cache", _k("IRMAP_CACHE", "irmap_cache_entry", service=True)),
]


# A name is looked up by its pattern (its number, hex number or word replaced by N, X or
# S) in one dictionary: no regular expression per pattern to compile at import, or to try
# in turn for every file listed.
_BY_PATTERN: Dict[str, Kind] = {p: k for p, k in _PATTERNS}
_BY_NAME_KIND = {k.name: k for _, k in _PATTERNS}
_PLACEHOLDERS = [
    ("N", re.compile(r"(.*)-([0-9]{1,20})((?:\.tar\.gz)?)\Z", re.ASCII)),
    ("X", re.compile(r"(.*)-([0-9a-f]{1,16})()\Z", re.ASCII)),
    ("S", re.compile(r"(.*)-([a-z]{1,16})()\Z", re.ASCII)),
]


def kind_of(name: str) -> Tuple[Optional[Kind], Optional[str]]:
    """The kind of image file `name` and the number (or word) in its name, or (None, None).

    Every image file ends in .img except the service files (stats-dump, irmap-cache), which
    may also go without it."""
    has_img = name.endswith(".img")
    base = name[:-4] if has_img else name
    found: Tuple[Optional[Kind], Optional[str]] = (None, None)
    kind = _BY_PATTERN.get(base)
    if kind is not None and "N" not in base and "X" not in base and "S" not in base:
        found = (kind, None)
    else:
        for mark, regex in _PLACEHOLDERS:
            m = regex.match(base)
            if m and m.group(1) and f"{m.group(1)}-{mark}{m.group(3)}" in _BY_PATTERN:
                found = (_BY_PATTERN[f"{m.group(1)}-{mark}{m.group(3)}"], m.group(2))
                break
    if found[0] is None or not (has_img or found[0].service):
        return None, None
    return found


def kind_by_magic(magic: int) -> Optional[Kind]:
    """The kind whose magic is `magic` (for a file whose name says nothing), or None."""
    name = BY_MAGIC.get(magic)
    return _BY_NAME_KIND.get(name) if name else None


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def extra_size(kind: str, msg: object) -> int:
    """How many payload bytes follow entry `msg` of an "extra" layout image."""
    if kind in ("PIPES_DATA", "FIFO_DATA"):
        return int(msg.bytes)  # type: ignore[attr-defined]
    if kind == "SK_QUEUES":
        return int(msg.length)  # type: ignore[attr-defined]
    if kind == "TCP_STREAM":
        return int(msg.inq_len) + int(msg.outq_len)  # type: ignore[attr-defined]
    if kind == "IPCNS_SEM":
        return round_up(2 * int(msg.nsems), 8)  # type: ignore[attr-defined]
    if kind == "IPCNS_SHM":
        if msg.in_pagemaps:  # type: ignore[attr-defined]
            return 0  # the segment's pages are in pagemap-shmem-ID / pages images
        return round_up(int(msg.size), 4)  # type: ignore[attr-defined]
    if kind == "BPFMAP_DATA":
        return int(msg.keys_bytes) + int(msg.values_bytes)  # type: ignore[attr-defined]
    raise AssertionError(f"no payload rule for {kind}")
