/* Kernel feature probes for `pycpt check` (pycpt.doctor): each asks the kernel once and leaves
 * nothing behind. All return 0 or -errno and pass results through out-parameters; a probe
 * this build could not compile returns -ENOSYS, and its PYCPT_HAS_* flag below is 0.
 */
#ifndef PYCPT_PROBE_H
#define PYCPT_PROBE_H

#include <stdint.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

/* How a userfaultfd was made, or which way's error is returned. */
#define PYCPT_PROBE_UFFD_SYSCALL 1 /* userfaultfd(2) */
#define PYCPT_PROBE_UFFD_DEV 2     /* ioctl(USERFAULTFD_IOC_NEW) on /dev/userfaultfd */

#if defined(__NR_userfaultfd) || defined(USERFAULTFD_IOC_NEW)
#define PYCPT_HAS_USERFAULTFD 1
#else
#define PYCPT_HAS_USERFAULTFD 0
#endif

#ifdef PR_SET_MM_MAP_SIZE
#define PYCPT_HAS_MM_MAP_SIZE 1
#else
#define PYCPT_HAS_MM_MAP_SIZE 0
#endif

/* PAGEMAP_SCAN came with the Linux 6.7 headers (Debian 12 ships 6.1). Without it, probe.c
 * uses its own copy of the uapi definitions, so the probe is always built; the Python side
 * reads PYCPT_PAGEMAP_SCAN_FROM_HEADERS to say which. */
#define PYCPT_HAS_PAGEMAP_SCAN 1
#ifdef PAGEMAP_SCAN
#define PYCPT_PAGEMAP_SCAN_FROM_HEADERS 1
#else
#define PYCPT_PAGEMAP_SCAN_FROM_HEADERS 0
#endif

/* UFFD_FEATURE_WP_ASYNC (Linux 6.7 headers): the value of include/uapi/linux/userfaultfd.h
 * when the headers predate it; it is only compared with what UFFDIO_API reports. */
#ifdef UFFD_FEATURE_WP_ASYNC
#define PYCPT_PROBE_UFFD_FEATURE_WP_ASYNC ((uint64_t)UFFD_FEATURE_WP_ASYNC)
#else
#define PYCPT_PROBE_UFFD_FEATURE_WP_ASYNC ((uint64_t)1 << 15)
#endif

/* Make a userfaultfd (user-mode faults only), ask UFFDIO_API for its features, close it.
 * how: the way that made it (or whose error is returned); made: 1 if an fd was made, i.e. a
 * failure is UFFDIO_API's. */
int pycpt_probe_userfaultfd(int *how, int *made, uint64_t *features);
/* An empty-range PAGEMAP_SCAN on an open /proc/<pid>/pagemap: 0, or -ENOTTY before 6.7. */
int pycpt_probe_pagemap_scan(int pagemap_fd);
/* prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE): reads sizeof(struct prctl_mm_map), changes nothing;
 * works only with CONFIG_CHECKPOINT_RESTORE. */
int pycpt_probe_mm_map_size(unsigned int *size);
/* Is the soft-dirty bit (pagemap bit 55) set on a page written after clear_refs 4? -ENODATA
 * when the page is not present in pagemap (no answer). */
int pycpt_probe_soft_dirty(int *set);

#endif
