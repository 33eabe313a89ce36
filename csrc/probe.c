/* Kernel feature probes: userfaultfd, PAGEMAP_SCAN, PR_SET_MM_MAP_SIZE, soft-dirty.
 *
 * Constants come from the kernel headers. The one exception is PAGEMAP_SCAN, which this
 * file defines itself when <linux/fs.h> is older than Linux 6.7: the probe asks the running
 * kernel, which may well be newer than the build machine's headers.
 */
#define _GNU_SOURCE
#include "probe.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifdef PAGEMAP_SCAN
typedef struct pm_scan_arg pycpt_pm_scan_arg;
#define PYCPT_PAGEMAP_SCAN PAGEMAP_SCAN
#else
/* The headers predate Linux 6.7: struct pm_scan_arg and PAGEMAP_SCAN as in Linux 6.7's
 * include/uapi/linux/fs.h (PAGEMAP_IOCTL_MAGIC 'f', nr 16; also ioctl_pagemap_scan(2)), a
 * stable ABI; the struct's size is in the ioctl number and the kernel checks arg.size. */
typedef struct {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
} pycpt_pm_scan_arg;
#define PYCPT_PAGEMAP_SCAN _IOWR('f', 16, pycpt_pm_scan_arg)
#endif

_Static_assert(sizeof(pycpt_pm_scan_arg) == 96, "struct pm_scan_arg is 96 bytes");

#ifdef UFFD_USER_MODE_ONLY
#define UFFD_FLAGS (O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)
#else
#define UFFD_FLAGS (O_CLOEXEC | O_NONBLOCK)
#endif

/* A userfaultfd, or -errno; the syscall first, then /dev/userfaultfd (Linux >= 6.1), which
 * works where vm.unprivileged_userfaultfd=0 refuses the syscall to a user with access to it.
 * The syscall's error wins: it is the one that says why. */
static int uffd_make(int *how)
{
	int err = -ENOSYS;

	*how = 0;
#ifdef __NR_userfaultfd
	{
		long fd = syscall(__NR_userfaultfd, UFFD_FLAGS);

		*how = PYCPT_PROBE_UFFD_SYSCALL;
		if (fd >= 0)
			return (int)fd;
		err = -errno;
	}
#endif
#ifdef USERFAULTFD_IOC_NEW
	{
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		int fd = -1;
		bool had_syscall = *how == PYCPT_PROBE_UFFD_SYSCALL;

		if (dev >= 0) {
			fd = ioctl(dev, USERFAULTFD_IOC_NEW, UFFD_FLAGS);
			if (fd < 0 && !had_syscall)
				err = -errno;
			close(dev);
		} else if (!had_syscall) {
			err = -errno;
		}
		if (fd >= 0) {
			*how = PYCPT_PROBE_UFFD_DEV;
			return fd;
		}
		if (!had_syscall)
			*how = PYCPT_PROBE_UFFD_DEV;
	}
#endif
	return err;
}

int pycpt_probe_userfaultfd(int *how, int *made, uint64_t *features)
{
	struct uffdio_api api = { .api = UFFD_API, .features = 0 }; /* no features requested */
	int fd, ret = 0;

	*made = 0;
	*features = 0;
	fd = uffd_make(how);
	if (fd < 0)
		return fd;
	*made = 1;
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		ret = -errno;
	else
		*features = api.features;
	close(fd);
	return ret;
}

int pycpt_probe_pagemap_scan(int pagemap_fd)
{
	pycpt_pm_scan_arg arg;

	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg); /* start == end: an empty range, nothing is read or cleared */
	if (ioctl(pagemap_fd, PYCPT_PAGEMAP_SCAN, &arg) < 0)
		return -errno;
	return 0;
}

int pycpt_probe_mm_map_size(unsigned int *size)
{
	*size = 0;
#ifdef PR_SET_MM_MAP_SIZE
	if (prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE, (unsigned long)size, 0UL, 0UL) < 0)
		return -errno;
	return 0;
#else
	return -ENOSYS;
#endif
}

static int write_all(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;
	int ret = 0;

	if (fd < 0)
		return -errno;
	n = write(fd, text, strlen(text));
	if (n < 0)
		ret = -errno;
	else if ((size_t)n != strlen(text))
		ret = -EIO;
	close(fd);
	return ret;
}

int pycpt_probe_soft_dirty(int *set)
{
	long page = sysconf(_SC_PAGESIZE);
	volatile char *p;
	uint64_t entry = 0;
	int fd, ret;

	*set = 0;
	if (page <= 0)
		return -EINVAL;
	p = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return -errno;
	p[0] = 'x';
	/* CLEAR_REFS_SOFT_DIRTY: clears this process's own soft-dirty bits, nothing else */
	ret = write_all("/proc/self/clear_refs", "4");
	if (ret < 0)
		goto out;
	p[0] = 'y';
	fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		goto out;
	}
	if (pread(fd, &entry, sizeof(entry), (off_t)((uintptr_t)p / (uintptr_t)page * 8)) !=
	    (ssize_t)sizeof(entry))
		ret = errno ? -errno : -EIO;
	close(fd);
	if (ret < 0)
		goto out;
	if (!(entry >> 63 & 1)) { /* not present: no answer */
		ret = -ENODATA;
		goto out;
	}
	*set = (int)(entry >> 55 & 1);
out:
	munmap((void *)p, (size_t)page);
	return ret;
}
