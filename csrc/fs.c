/*
 * File system calls Python's os module lacks. renameat2 goes through syscall(2), so that it
 * does not depend on the C library's wrapper (glibc >= 2.28).
 */
#define _GNU_SOURCE
#include "fs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

int pycpt_fs_exchange(const char *a, const char *b)
{
#ifdef SYS_renameat2
	if (syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) < 0)
		return -errno;
	return 0;
#else
	(void)a;
	(void)b;
	return -ENOSYS;
#endif
}

int pycpt_fs_type(const char *path, int64_t *type_out)
{
	struct statfs st;

	if (statfs(path, &st) < 0)
		return -errno;
	*type_out = (int64_t)st.f_type;
	return 0;
}
