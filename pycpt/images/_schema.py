"""CRIU's image messages (CRIU >= 4.2), declared as data and compiled by the protobuf runtime.

The wire format is CRIU's (its images/*.proto, proto2): message and field names, field numbers,
types and labels below follow CRIU, so that entries decode exactly as CRIU wrote them and a
JSON rendering reads like `crit`'s. Declaring them here keeps the build free of protoc;
tests/test_images_schema.py checks every field against the descriptors CRIU itself ships.

Each message is one string of comma-separated fields, `NUMBER NAME TYPE[MARK][=DEFAULT]`:
TYPE is a scalar (u32 u64 i32 i64 s32 s64 f64 bool str bytes), an enum or another message of
this table; MARK `!` is required, `*` repeated, none optional.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "u32": _F.TYPE_UINT32,
    "u64": _F.TYPE_UINT64,
    "i32": _F.TYPE_INT32,
    "i64": _F.TYPE_INT64,
    "s32": _F.TYPE_SINT32,
    "s64": _F.TYPE_SINT64,
    "f64": _F.TYPE_FIXED64,
    "bool": _F.TYPE_BOOL,
    "str": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}
_LABELS = {"!": _F.LABEL_REQUIRED, "*": _F.LABEL_REPEATED, "": _F.LABEL_OPTIONAL}

# enum name -> {value name: number}; "msg.name" is an enum nested in message msg.
ENUMS: Dict[str, Dict[str, int]] = {
    "core_entry.march": {
        "UNKNOWN": 0,
        "X86_64": 1,
        "ARM": 2,
        "AARCH64": 3,
        "PPC64": 4,
        "S390": 5,
        "MIPS": 6,
        "LOONGARCH64": 7,
        "RISCV64": 8,
    },
    "seccomp_mode": {"disabled": 0, "strict": 1, "filter": 2},
    "user_x86_regs_mode": {"NATIVE": 1, "COMPAT": 2},
    "cpuinfo_x86_entry.vendor": {"UNKNOWN": 0, "INTEL": 1, "AMD": 2},
    "cpuinfo_ppc64_entry.endianness": {"BIGENDIAN": 0, "LITTLEENDIAN": 1},
    # what a file entry is; CTL_TTY and AUTOFS_PIPE are CRIU-internal
    "fd_types": {
        "UND": 0,
        "REG": 1,
        "PIPE": 2,
        "FIFO": 3,
        "INETSK": 4,
        "UNIXSK": 5,
        "EVENTFD": 6,
        "EVENTPOLL": 7,
        "INOTIFY": 8,
        "SIGNALFD": 9,
        "PACKETSK": 10,
        "TTY": 11,
        "FANOTIFY": 12,
        "NETLINKSK": 13,
        "NS": 14,
        "TUNF": 15,
        "EXT": 16,
        "TIMERFD": 17,
        "MEMFD": 18,
        "BPFMAP": 19,
        "PIDFD": 20,
        "CTL_TTY": 65534,
        "AUTOFS_PIPE": 65535,
    },
    "mark_type": {"INODE": 1, "MOUNT": 2},
    "lsmtype": {"NO_LSM": 0, "SELINUX": 1, "APPARMOR": 2},
    "nd_type": {
        "LOOPBACK": 1,
        "VETH": 2,
        "TUN": 3,
        "EXTLINK": 4,
        "VENET": 5,
        "BRIDGE": 6,
        "MACVLAN": 7,
        "SIT": 8,
    },
    "remap_type": {"LINKED": 0, "GHOST": 1, "PROCFS": 2},
    "sk_shutdown": {"NONE": 0, "READ": 1, "WRITE": 2, "BOTH": 3},
    "SysctlType": {"CTL_STR": 5, "CTL_32": 6},
    "TtyType": {
        "UNKNOWN": 0,
        "PTY": 1,
        "CONSOLE": 2,
        "VT": 3,
        "CTTY": 4,
        "EXT_TTY": 5,
        "SERIAL": 6,
    },
}

MESSAGES: Dict[str, str] = {
    # apparmor.img: AppArmor namespaces and policies CRIU carried over
    "aa_policy": "1 name str!, 2 blob bytes!",
    "aa_namespace": "1 name str!, 2 policies aa_policy*, 3 namespaces aa_namespace*",
    "apparmor_entry": "1 namespaces aa_namespace*",
    # autofs-N.img: an autofs mount's pipe and options
    "autofs_entry": "1 fd i32!, 2 pgrp i32!, 3 timeout i32!, 4 minproto i32!, 5 maxproto i32!,"
    "6 mode i32!, 7 uid i32, 8 gid i32, 9 read_fd i32",
    # binfmt-misc.img: binfmt_misc handlers of a mount namespace
    "binfmt_misc_entry": "1 name str!, 2 enabled bool!, 3 interpreter str!, 4 flags str,"
    "5 extension str, 6 magic str, 7 mask str, 8 offset i32",
    # bpfmap-data.img: a BPF map's keys and values follow each entry
    "bpfmap_data_entry": "1 map_id u32!, 2 keys_bytes u32!, 3 values_bytes u32!, 4 count u32!",
    # a BPF map descriptor (files.img, type BPFMAP)
    "bpfmap_file_entry": "1 id u32!, 2 flags u32!, 3 pos u64!, 4 fown fown_entry!,"
    "5 map_type u32!, 6 key_size u32!, 7 value_size u32!, 8 map_id u32!, 9 max_entries u32!,"
    "10 map_flags u32!, 11 memlock u64!, 12 frozen bool!=false, 13 map_name str!,"
    "14 ifindex u32!=0, 15 mnt_id s32=-1, 16 map_extra u64",
    # cgroup.img: cgroup sets (what each task belongs to) and the controllers' trees
    "cgroup_perms": "1 mode u32!, 2 uid u32!, 3 gid u32!",
    "cgroup_prop_entry": "1 name str!, 2 value str!, 3 perms cgroup_perms",
    "cgroup_dir_entry": "1 dir_name str!, 2 children cgroup_dir_entry*,"
    "3 properties cgroup_prop_entry*, 4 dir_perms cgroup_perms",
    "cg_controller_entry": "1 cnames str*, 2 dirs cgroup_dir_entry*, 3 is_threaded bool",
    "cg_member_entry": "1 name str!, 2 path str!, 3 cgns_prefix u32",
    "cg_set_entry": "1 id u32!, 2 ctls cg_member_entry*",
    "cgroup_entry": "1 sets cg_set_entry*, 2 controllers cg_controller_entry*",
    # core-TID.img, ids-PID.img: a task's state, its threads and its kernel objects
    "task_core_entry": "1 task_state u32!, 2 exit_code u32!, 3 personality u32!, 4 flags u32!,"
    "5 blk_sigset u64!, 6 comm str!, 7 timers task_timers_entry,"
    "8 rlimits task_rlimits_entry, 9 cg_set u32, 10 signals_s signal_queue_entry,"
    "11 old_seccomp_mode seccomp_mode, 12 old_seccomp_filter u32, 13 loginuid u32,"
    "14 oom_score_adj i32, 15 sigactions sa_entry*, 18 child_subreaper bool,"
    "20 blk_sigset_extended u64, 21 stop_signo u32, 22 membarrier_registration_mask u32",
    "task_kobj_ids_entry": "1 vm_id u32!, 2 files_id u32!, 3 fs_id u32!, 4 sighand_id u32!,"
    "5 pid_ns_id u32, 6 net_ns_id u32, 7 ipc_ns_id u32, 8 uts_ns_id u32, 9 mnt_ns_id u32,"
    "10 user_ns_id u32, 11 cgroup_ns_id u32, 12 time_ns_id u32",
    "thread_sas_entry": "1 ss_sp u64!, 2 ss_size u64!, 3 ss_flags u32!",
    "thread_core_entry": "1 futex_rla u64!, 2 futex_rla_len u32!, 3 sched_nice s32,"
    "4 sched_policy u32, 5 sched_prio u32, 6 blk_sigset u64, 7 sas thread_sas_entry,"
    "8 pdeath_sig u32, 9 signals_p signal_queue_entry, 10 creds creds_entry,"
    "11 seccomp_mode seccomp_mode, 12 seccomp_filter u32, 13 comm str,"
    "14 blk_sigset_extended u64, 15 rseq_entry rseq_entry, 16 cg_set u32",
    "task_rlimits_entry": "1 rlimits rlimit_entry*",
    # one per thread (core-TID.img); tc only in a process's main thread. The register sets of
    # other architectures (fields 6, 8-13) are not declared: they stay unknown fields here.
    "core_entry": "1 mtype core_entry.march!, 2 thread_info thread_info_x86,"
    "3 tc task_core_entry, 4 ids task_kobj_ids_entry, 5 thread_core thread_core_entry",
    # x86-64 registers (core_entry.thread_info)
    "user_x86_regs_entry": "1 r15 u64!, 2 r14 u64!, 3 r13 u64!, 4 r12 u64!, 5 bp u64!, 6 bx u64!,"
    "7 r11 u64!, 8 r10 u64!, 9 r9 u64!, 10 r8 u64!, 11 ax u64!, 12 cx u64!, 13 dx u64!,"
    "14 si u64!, 15 di u64!, 16 orig_ax u64!, 17 ip u64!, 18 cs u64!, 19 flags u64!,"
    "20 sp u64!, 21 ss u64!, 22 fs_base u64!, 23 gs_base u64!, 24 ds u64!, 25 es u64!,"
    "26 fs u64!, 27 gs u64!, 28 mode user_x86_regs_mode=NATIVE",
    "user_x86_cet_entry": "1 cet u64!, 2 ssp u64!",
    "user_x86_xsave_entry": "1 xstate_bv u64!, 2 ymmh_space u32*, 3 bndreg_state u64*,"
    "4 bndcsr_state u64*, 5 opmask_reg u64*, 6 zmm_upper u64*, 7 hi16_zmm u64*, 8 pkru u32*,"
    "9 cet user_x86_cet_entry",
    "user_x86_fpregs_entry": "1 cwd u32!, 2 swd u32!, 3 twd u32!, 4 fop u32!, 5 rip u64!,"
    "6 rdp u64!, 7 mxcsr u32!, 8 mxcsr_mask u32!, 9 st_space u32*, 10 xmm_space u32*,"
    "11 padding u32*, 13 xsave user_x86_xsave_entry",
    "user_desc_t": "1 entry_number u32!, 2 base_addr u32!, 3 limit u32!, 4 seg_32bit bool!,"
    "5 contents_h bool!, 6 contents_l bool!, 7 read_exec_only bool!=true,"
    "8 limit_in_pages bool!, 9 seg_not_present bool!=true, 10 usable bool!",
    "thread_info_x86": "1 clear_tid_addr u64!, 2 gpregs user_x86_regs_entry!,"
    "3 fpregs user_x86_fpregs_entry!, 4 tls user_desc_t*",
    # cpuinfo.img: the dumping CPU's features (CPUINFO_DUMP/CHECK)
    "cpuinfo_x86_entry": "1 vendor_id cpuinfo_x86_entry.vendor!, 2 cpu_family u32!, 3 model u32!,"
    "4 stepping u32!, 5 capability_ver u32!, 6 capability u32*, 7 model_id str,"
    "8 xfeatures_mask u64, 9 xsave_size u32, 10 xsave_size_max u32",
    "cpuinfo_ppc64_entry": "1 endian cpuinfo_ppc64_entry.endianness!, 2 hwcap u64*",
    "cpuinfo_s390_entry": "2 hwcap u64*",
    "cpuinfo_entry": "1 x86_entry cpuinfo_x86_entry*, 2 ppc64_entry cpuinfo_ppc64_entry*,"
    "3 s390_entry cpuinfo_s390_entry*",
    # credentials (thread_core.creds; creds-N.img in old images)
    "creds_entry": "1 uid u32!, 2 gid u32!, 3 euid u32!, 4 egid u32!, 5 suid u32!, 6 sgid u32!,"
    "7 fsuid u32!, 8 fsgid u32!, 9 cap_inh u32*, 10 cap_prm u32*, 11 cap_eff u32*,"
    "12 cap_bnd u32*, 13 secbits u32!, 14 groups u32*, 15 lsm_profile str,"
    "16 lsm_sockcreate str, 17 apparmor_data bytes, 18 no_new_privs u32, 19 cap_amb u32*",
    # an eventfd (files.img, type EVENTFD)
    "eventfd_file_entry": "1 id u32!, 2 flags u32!, 3 fown fown_entry!, 4 counter u64!",
    # an epoll instance and the descriptors it watches
    "eventpoll_tfd_entry": "1 id u32!, 2 tfd u32!, 3 events u32!, 4 data u64!, 5 dev u32,"
    "6 inode u64, 7 pos u64",
    "eventpoll_file_entry": "1 id u32!, 2 flags u32!, 3 fown fown_entry!,"
    "4 tfd eventpoll_tfd_entry*",
    # a descriptor handed in from outside (--external)
    "ext_file_entry": "1 id u32!, 5 fown fown_entry!",
    # fdinfo-FILES_ID.img: fd number -> file id; files.img: every file by id
    "fdinfo_entry": "1 id u32!, 2 flags u32!, 3 type fd_types!, 4 fd u32!,"
    "5 xattr_security_selinux str",
    "file_entry": "1 type fd_types!, 2 id u32!, 3 reg reg_file_entry, 4 isk inet_sk_entry,"
    "5 nsf ns_file_entry, 6 psk packet_sock_entry, 7 nlsk netlink_sk_entry,"
    "8 efd eventfd_file_entry, 9 epfd eventpoll_file_entry, 10 sgfd signalfd_entry,"
    "11 tunf tunfile_entry, 12 tfd timerfd_entry, 13 ify inotify_file_entry,"
    "14 ffy fanotify_file_entry, 15 ext ext_file_entry, 16 usk unix_sk_entry,"
    "17 fifo fifo_entry, 18 pipe pipe_entry, 19 tty tty_file_entry,"
    "20 memfd memfd_file_entry, 21 bpf bpfmap_file_entry, 22 pidfd pidfd_entry",
    # file handles (inotify/fanotify) and irmap-cache.img
    "fh_entry": "1 bytes u32!, 2 type u32!, 3 handle u64*, 4 path str, 5 mnt_id u32",
    "irmap_cache_entry": "1 dev u32!, 2 inode u64!, 3 path str!",
    # a FIFO (named pipe)
    "fifo_entry": "1 id u32!, 2 pipe_id u32!, 3 regf_id u32",
    # filelocks.img: POSIX/flock/OFD locks
    "file_lock_entry": "1 flag u32!, 2 type u32!, 3 pid i32!, 4 fd i32!, 5 start i64!, 6 len i64!",
    # owner of a file's signals (F_SETOWN), part of every file entry
    "fown_entry": "1 uid u32!, 2 euid u32!, 3 signum u32!, 4 pid_type u32!, 5 pid u32!",
    # fs-PID.img: cwd and root (as file ids) and umask
    "fs_entry": "1 cwd_id u32!, 2 root_id u32!, 3 umask u32",
    # inotify and fanotify instances and their watches
    "inotify_wd_entry": "1 id u32!, 2 i_ino u64!, 3 mask u32!, 4 ignored_mask u32!, 5 s_dev u32!,"
    "6 wd u32!, 7 f_handle fh_entry!",
    "inotify_file_entry": "1 id u32!, 2 flags u32!, 4 fown fown_entry!, 5 wd inotify_wd_entry*",
    "fanotify_inode_mark_entry": "1 i_ino u64!, 2 f_handle fh_entry!",
    "fanotify_mount_mark_entry": "1 mnt_id u32!, 2 path str",
    "fanotify_mark_entry": "1 id u32!, 2 type mark_type!, 3 mflags u32!, 4 mask u32!,"
    "5 ignored_mask u32!, 6 s_dev u32!, 7 ie fanotify_inode_mark_entry,"
    "8 me fanotify_mount_mark_entry",
    "fanotify_file_entry": "1 id u32!, 2 flags u32!, 3 fown fown_entry!, 4 faflags u32!,"
    "5 evflags u32!, 6 mark fanotify_mark_entry*",
    # ghost-file-ID.img: a deleted but open file's content
    "ghost_file_entry": "1 uid u32!, 2 gid u32!, 3 mode u32!, 4 dev u32, 5 ino u64, 6 rdev u32,"
    "7 atim timeval, 8 mtim timeval, 9 chunks bool, 10 size u64, 11 symlnk_target str",
    "ghost_chunk_entry": "1 len u64!, 2 off u64!",
    # inventory.img: how the dump was made; the dumping CRIU's own namespaces
    "plugins_entry": "12 plugins str*",
    "inventory_entry": "1 img_version u32!, 2 fdinfo_per_id bool, 3 root_ids task_kobj_ids_entry,"
    "4 ns_per_id bool, 5 root_cg_set u32, 6 lsmtype lsmtype, 8 dump_uptime u64,"
    "9 pre_dump_mode u32, 10 tcp_close bool, 11 network_lock_method u32,"
    "12 plugins_entry plugins_entry, 13 dump_criu_run_id str, 14 allow_uprobes bool",
    # System V IPC objects (ipcns-shm/msg/sem-ID.img) and limits (ipcns-var-ID.img)
    "ipc_desc_entry": "1 key u32!, 2 uid u32!, 3 gid u32!, 4 cuid u32!, 5 cgid u32!, 6 mode u32!,"
    "7 id u32!",
    "ipc_msg": "1 mtype u64!, 2 msize u32!",
    "ipc_msg_entry": "1 desc ipc_desc_entry!, 2 qbytes u32!, 3 qnum u32!",
    "ipc_sem_entry": "1 desc ipc_desc_entry!, 2 nsems u32!",
    "ipc_shm_entry": "1 desc ipc_desc_entry!, 2 size u64!, 3 in_pagemaps bool, 4 hugetlb_flag u32",
    "ipc_var_entry": "1 sem_ctls u32*, 2 msg_ctlmax u32!, 3 msg_ctlmnb u32!, 4 msg_ctlmni u32!,"
    "5 auto_msgmni u32!, 6 shm_ctlmax u64!, 7 shm_ctlall u64!, 8 shm_ctlmni u32!,"
    "9 shm_rmid_forced u32!, 10 mq_queues_max u32!, 11 mq_msg_max u32!,"
    "12 mq_msgsize_max u32!, 13 mq_msg_default u32, 14 mq_msgsize_default u32,"
    "15 msg_next_id u32, 16 sem_next_id u32, 17 shm_next_id u32",
    # network devices, netns-ID.img sysctls and ids
    "macvlan_link_entry": "1 mode u32!, 2 flags u32",
    # memfd.img: a memfd's inode; its content is in pagemap-shmem/pages images
    "memfd_file_entry": "1 id u32!, 2 flags u32!, 3 pos u64!, 4 fown fown_entry!, 5 inode_id u32!",
    "memfd_inode_entry": "1 name str!, 2 uid u32!, 3 gid u32!, 4 size u64!, 5 shmid u32!,"
    "6 seals u32!, 7 inode_id u64!, 8 hugetlb_flag u32, 9 mode u32",
    # mm-PID.img: address space layout, the VMAs and AIO rings
    "aio_ring_entry": "1 id u64!, 2 nr_req u32!, 3 ring_len u32!",
    "mm_entry": "1 mm_start_code u64!, 2 mm_end_code u64!, 3 mm_start_data u64!,"
    "4 mm_end_data u64!, 5 mm_start_stack u64!, 6 mm_start_brk u64!, 7 mm_brk u64!,"
    "8 mm_arg_start u64!, 9 mm_arg_end u64!, 10 mm_env_start u64!, 11 mm_env_end u64!,"
    "12 exe_file_id u32!, 13 mm_saved_auxv u64*, 14 vmas vma_entry*, 15 dumpable i32,"
    "16 aios aio_ring_entry*, 17 thp_disabled bool",
    # mountpoints-ID.img: one mount namespace's mounts
    "mnt_entry": "1 fstype u32!, 2 mnt_id u32!, 3 root_dev u32!, 4 parent_mnt_id u32!,"
    "5 flags u32!, 6 root str!, 7 mountpoint str!, 8 source str!, 9 options str!,"
    "10 shared_id u32, 11 master_id u32, 12 with_plugin bool, 13 ext_mount bool,"
    "14 fsname str, 15 internal_sharing bool, 16 deleted bool, 17 sb_flags u32, 18 ext_key str",
    "net_device_entry": "1 type nd_type!, 2 ifindex u32!, 3 mtu u32!, 4 flags u32!, 5 name str!,"
    "6 tun tun_link_entry, 7 address bytes, 8 conf i32*, 9 conf4 sysctl_entry*,"
    "10 conf6 sysctl_entry*, 11 macvlan macvlan_link_entry, 12 peer_ifindex u32,"
    "13 peer_nsid u32, 14 master u32, 15 sit sit_entry",
    "netns_id": "1 target_ns_id u32!, 2 netnsid_value i32!",
    "netns_entry": "1 def_conf i32*, 2 all_conf i32*, 3 def_conf4 sysctl_entry*,"
    "4 all_conf4 sysctl_entry*, 5 def_conf6 sysctl_entry*, 6 all_conf6 sysctl_entry*,"
    "7 nsids netns_id*, 8 ext_key str, 9 unix_conf sysctl_entry*, 10 ipv4_sysctl sysctl_entry*",
    # a descriptor of a namespace (/proc/PID/ns/...)
    "ns_file_entry": "1 id u32!, 2 ns_id u32!, 3 ns_cflag u32!, 4 flags u32!",
    # AF_PACKET sockets
    "packet_mclist": "1 index u32!, 2 type u32!, 3 addr bytes!",
    "packet_ring": "1 block_size u32!, 2 block_nr u32!, 3 frame_size u32!, 4 frame_nr u32!,"
    "5 retire_tmo u32!, 6 sizeof_priv u32!, 7 features u32!",
    "packet_sock_entry": "1 id u32!, 2 type u32!, 3 protocol u32!, 4 flags u32!, 5 ifindex u32!,"
    "6 fown fown_entry!, 7 opts sk_opts_entry!, 8 version u32!, 9 reserve u32!,"
    "10 aux_data bool!, 11 orig_dev bool!, 12 vnet_hdr bool!, 13 loss bool!,"
    "14 timestamp u32!, 15 copy_thresh u32!, 16 mclist packet_mclist*,"
    "17 fanout u32=4294967295, 18 rx_ring packet_ring, 19 tx_ring packet_ring, 20 ns_id u32",
    # pagemap-PID.img (and pagemap-shmem-SHMID.img): a head naming pages-ID.img, then runs of pages
    "pagemap_head": "1 pages_id u32!",
    "pagemap_entry": "1 vaddr u64!, 2 compat_nr_pages u32!, 3 in_parent bool, 4 flags u32,"
    "5 nr_pages u64",
    # a pidfd
    "pidfd_entry": "1 id u32!, 2 ino u32!, 3 flags u32!, 4 nspid i32!, 5 fown fown_entry!",
    # pidns-ID.img: an external pid namespace's key
    "pidns_entry": "1 ext_key str",
    # pipes-data.img, fifo-data.img: the bytes queued in a pipe follow each entry
    "pipe_data_entry": "1 pipe_id u32!, 2 bytes u32!, 3 size u32",
    "pipe_entry": "1 id u32!, 2 pipe_id u32!, 3 flags u32!, 4 fown fown_entry!",
    # pstree.img: every process, root first, with its threads
    "pstree_entry": "1 pid u32!, 2 ppid u32!, 3 pgid u32!, 4 sid u32!, 5 threads u32*",
    # a regular file, directory or mapped file
    "reg_file_entry": "1 id u32!, 2 flags u32!, 3 pos u64!, 5 fown fown_entry!, 6 name str!,"
    "7 mnt_id s32=-1, 8 size u64, 9 ext bool, 10 mode u32, 11 build_id u32*, 12 checksum u32,"
    "13 checksum_config u32, 14 checksum_parameter u32",
    # remap-fpath.img: files reached through a ghost or a link-remap
    "remap_file_path_entry": "1 orig_id u32!, 2 remap_id u32!, 3 remap_type remap_type",
    # resource limits (task_core.rlimits)
    "rlimit_entry": "1 cur u64!, 2 max u64!",
    # restartable sequences of a thread
    "rseq_entry": "1 rseq_abi_pointer u64!, 2 rseq_abi_size u32!, 3 signature u32!,"
    "4 rseq_cs_pointer u64",
    # signal handlers (task_core.sigactions; sigacts-PID.img in old images)
    "sa_entry": "1 sigaction u64!, 2 flags u64!, 3 restorer u64!, 4 mask u64!,"
    "5 compat_sigaction bool, 6 mask_extended u64",
    # seccomp.img: the seccomp filters, chained by index
    "seccomp_filter": "1 filter bytes!, 2 prev u32, 3 flags u32",
    "seccomp_entry": "1 seccomp_filters seccomp_filter*",
    # queued signals (thread_core.signals_p, task_core.signals_s)
    "siginfo_entry": "1 siginfo bytes!",
    "signal_queue_entry": "1 signals siginfo_entry*",
    # a signalfd
    "signalfd_entry": "1 id u32!, 2 flags u32!, 3 fown fown_entry!, 4 sigmask u64!",
    # SIT tunnel devices
    "sit_entry": "1 link u32, 2 local u32*, 3 remote u32*, 4 ttl u32, 5 tos u32, 6 pmtudisc bool,"
    "7 proto u32, 8 flags u32, 9 encap_type u32, 10 encap_flags u32, 11 encap_sport u32,"
    "12 encap_dport u32, 13 rd_prefixlen u32, 14 rd_prefix u32*, 15 relay_prefixlen u32,"
    "16 relay_prefix u32*",
    # inet sockets: TCP/UDP/raw, IPv4/IPv6 addresses as 1 or 4 u32 words
    "ip_opts_raw_entry": "1 hdrincl bool, 2 nodefrag bool, 3 checksum bool, 4 icmpv_filter u32*",
    "ip_opts_entry": "1 freebind bool, 4 raw ip_opts_raw_entry, 5 pktinfo bool, 6 tos u32,"
    "7 ttl u32",
    "inet_sk_entry": "1 id u32!, 2 ino u32!, 3 family u32!, 4 type u32!, 5 proto u32!,"
    "6 state u32!, 7 src_port u32!, 8 dst_port u32!, 9 flags u32!, 10 backlog u32!,"
    "11 src_addr u32*, 12 dst_addr u32*, 13 fown fown_entry!, 14 opts sk_opts_entry!,"
    "15 v6only bool, 16 ip_opts ip_opts_entry, 17 ifname str, 18 ns_id u32,"
    "19 shutdown sk_shutdown, 20 tcp_opts tcp_opts_entry",
    # netlink sockets
    "netlink_sk_entry": "1 id u32!, 2 ino u32!, 3 protocol u32!, 4 state u32!, 6 flags u32!,"
    "7 portid u32!, 8 groups u32*, 9 dst_portid u32!, 10 dst_group u32!, 11 fown fown_entry!,"
    "12 opts sk_opts_entry!, 13 ns_id u32",
    # socket options common to every socket type
    "sk_opts_entry": "1 so_sndbuf u32!, 2 so_rcvbuf u32!, 3 so_snd_tmo_sec u64!,"
    "4 so_snd_tmo_usec u64!, 5 so_rcv_tmo_sec u64!, 6 so_rcv_tmo_usec u64!, 7 reuseaddr bool,"
    "8 so_priority u32, 9 so_rcvlowat u32, 10 so_mark u32, 11 so_passcred bool,"
    "12 so_passsec bool, 13 so_dontroute bool, 14 so_no_check bool, 15 so_bound_dev str,"
    "16 so_filter f64*, 17 so_reuseport bool, 18 so_broadcast bool, 19 so_keepalive bool,"
    "20 tcp_keepcnt u32, 21 tcp_keepidle u32, 22 tcp_keepintvl u32, 23 so_oobinline u32,"
    "24 so_linger u32, 25 so_buf_lock u32",
    # sk-queues.img: a socket's queued packets; the bytes follow each entry
    "scm_entry": "1 type u32!, 2 rights u32*",
    "sk_packet_entry": "1 id_for u32!, 2 length u32!, 4 scm scm_entry*",
    # unix sockets
    "file_perms_entry": "1 mode u32!, 2 uid u32!, 3 gid u32!",
    "unix_sk_entry": "1 id u32!, 2 ino u32!, 3 type u32!, 4 state u32!, 5 flags u32!,"
    "6 uflags u32!, 7 backlog u32!, 8 peer u32!, 9 fown fown_entry!, 10 opts sk_opts_entry!,"
    "11 name bytes!, 12 shutdown sk_shutdown, 13 file_perms file_perms_entry,"
    "14 name_dir str, 15 deleted bool, 16 ns_id u32, 17 mnt_id s32=-1",
    # stats-dump, stats-restore (service images)
    "dump_stats_entry": "1 freezing_time u32!, 2 frozen_time u32!, 3 memdump_time u32!,"
    "4 memwrite_time u32!, 5 pages_scanned u64!, 6 pages_skipped_parent u64!,"
    "7 pages_written u64!, 8 irmap_resolve u32, 9 pages_lazy u64!, 10 page_pipes u64,"
    "11 page_pipe_bufs u64, 12 shpages_scanned u64, 13 shpages_skipped_parent u64,"
    "14 shpages_written u64",
    "restore_stats_entry": "1 pages_compared u64!, 2 pages_skipped_cow u64!, 3 forking_time u32!,"
    "4 restore_time u32!, 5 pages_restored u64",
    "stats_entry": "1 dump dump_stats_entry, 2 restore restore_stats_entry",
    # a sysctl value (netdev, netns)
    "sysctl_entry": "1 type SysctlType!, 2 iarg i32, 3 sarg str",
    # tcp-stream-INO.img: a connected TCP socket; its queues' bytes follow
    "tcp_opts_entry": "1 cork bool, 2 nodelay bool, 3 keepcnt u32, 4 keepidle u32, 5 keepintvl u32",
    "tcp_stream_entry": "1 inq_len u32!, 2 inq_seq u32!, 3 outq_len u32!, 4 outq_seq u32!,"
    "5 opt_mask u32!, 6 snd_wscale u32!, 7 mss_clamp u32!, 8 rcv_wscale u32, 9 timestamp u32,"
    "10 cork bool, 11 nodelay bool, 12 unsq_len u32, 13 snd_wl1 u32, 14 snd_wnd u32,"
    "15 max_window u32, 16 rcv_wnd u32, 17 rcv_wup u32",
    # timestamps
    "timeval": "1 tv_sec u64!, 2 tv_usec u64!",
    # timens-ID.img: a time namespace's offsets
    "timespec": "1 tv_sec u64!, 2 tv_nsec u64!",
    "timens_entry": "1 monotonic timespec!, 2 boottime timespec!",
    # itimers and POSIX timers (task_core.timers)
    "itimer_entry": "1 isec u64!, 2 iusec u64!, 3 vsec u64!, 4 vusec u64!",
    "posix_timer_entry": "1 it_id u32!, 2 clock_id u32!, 3 si_signo u32!, 4 it_sigev_notify u32!,"
    "5 sival_ptr u64!, 6 overrun u32!, 7 isec u64!, 8 insec u64!, 9 vsec u64!, 10 vnsec u64!,"
    "11 notify_thread_id i32",
    "task_timers_entry": "1 real itimer_entry!, 2 virt itimer_entry!, 3 prof itimer_entry!,"
    "4 posix posix_timer_entry*",
    # a timerfd
    "timerfd_entry": "1 id u32!, 2 flags u32!, 3 fown fown_entry!, 4 clockid u32!, 5 ticks u64!,"
    "6 settime_flags u32!, 7 vsec u64!, 8 vnsec u64!, 9 isec u64!, 10 insec u64!",
    # tty.img, tty-info.img, tty-data.img: terminals and their settings
    "winsize_entry": "1 ws_row u32!, 2 ws_col u32!, 3 ws_xpixel u32!, 4 ws_ypixel u32!",
    "termios_entry": "1 c_iflag u32!, 2 c_oflag u32!, 3 c_cflag u32!, 4 c_lflag u32!,"
    "5 c_line u32!, 6 c_ispeed u32!, 7 c_ospeed u32!, 8 c_cc u32*",
    "tty_pty_entry": "1 index u32!",
    "tty_data_entry": "1 tty_id u32!, 2 data bytes!",
    "tty_info_entry": "1 id u32!, 2 type TtyType!, 3 locked bool!, 4 exclusive bool!,"
    "5 packet_mode bool!, 6 sid u32!, 7 pgrp u32!, 8 rdev u32!, 9 termios termios_entry,"
    "10 termios_locked termios_entry, 11 winsize winsize_entry, 12 pty tty_pty_entry,"
    "13 dev u32, 14 uid u32, 15 gid u32",
    "tty_file_entry": "1 id u32!, 2 tty_info_id u32!, 3 flags u32!, 4 fown fown_entry!,"
    "6 regf_id u32",
    # tun/tap files and devices
    "tunfile_entry": "1 id u32!, 2 netdev str, 3 detached bool, 4 ns_id u32",
    "tun_link_entry": "1 flags u32!, 2 owner i32!, 3 group i32!, 4 vnethdr u32!, 5 sndbuf u32!",
    # userns-ID.img: uid/gid maps
    "uid_gid_extent": "1 first u32!, 2 lower_first u32!, 3 count u32!",
    "userns_entry": "1 uid_map uid_gid_extent*, 2 gid_map uid_gid_extent*",
    # utsns-ID.img: host and domain name
    "utsns_entry": "1 nodename str!, 2 domainname str!",
    # one memory area (mm_entry.vmas)
    "vma_entry": "1 start u64!, 2 end u64!, 3 pgoff u64!, 4 shmid u64!, 5 prot u32!,"
    "6 flags u32!, 7 status u32!, 8 fd s64!, 9 madv u64, 10 fdflags u32",
}

PACKAGE = "pycpt.criu_images"

Field = Tuple[str, int, int, str, str]  # name, number, label, type, default


def fields(message: str) -> List[Field]:
    """The fields of `message` as (name, number, label, type, default)."""
    out = []
    for spec in MESSAGES[message].split(","):
        number, name, kind = spec.split()
        kind, _, default = kind.partition("=")
        mark = kind[-1] if kind[-1] in "!*" else ""
        out.append((name, int(number), _LABELS[mark], kind.rstrip("!*"), default))
    return out


def _type_ref(kind: str) -> str:
    return f".{PACKAGE}.{kind}"


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """All messages and enums above as one proto2 file."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="pycpt/criu_images.proto", package=PACKAGE, syntax="proto2"
    )
    messages = {}
    for name in MESSAGES:
        messages[name] = fdp.message_type.add(name=name)
    for name, values in ENUMS.items():
        outer, _, inner = name.rpartition(".")
        enum = (messages[outer].enum_type if outer else fdp.enum_type).add(name=inner)
        for value, number in values.items():
            enum.value.add(name=value, number=number)
    for name in MESSAGES:
        for field_name, number, label, kind, default in fields(name):
            field = messages[name].field.add(name=field_name, number=number, label=label)
            if kind in _SCALARS:
                field.type = _SCALARS[kind]
            elif kind in ENUMS:
                field.type, field.type_name = _F.TYPE_ENUM, _type_ref(kind)
            elif kind in MESSAGES:
                field.type, field.type_name = _F.TYPE_MESSAGE, _type_ref(kind)
            else:
                raise AssertionError(f"{name}.{field_name}: unknown type {kind}")
            if default:
                field.default_value = default
    return fdp


def _build() -> Dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_descriptor())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in MESSAGES
    }


CLASSES: Dict[str, Any] = _build()
"""Message name -> its class (made at run time; Any to a type checker)."""
