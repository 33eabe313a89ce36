/* Other processes: descriptors taken from them (pidfd_getfd), and dying with our caller. */
#define _GNU_SOURCE
#include "proc.h"

#include <errno.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

int pycpt_proc_getfd(int pidfd, int fd)
{
	/* pidfd_getfd always sets close-on-exec on the new descriptor */
	long ret = syscall(SYS_pidfd_getfd, pidfd, fd, 0);

	return ret < 0 ? -errno : (int)ret;
}

int pycpt_proc_die_with_parent(int parent)
{
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
		return -errno;
	if (getppid() != parent)
		return -ESRCH;
	return 0;
}
