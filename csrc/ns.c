/* Entering namespaces (setns moves only the calling thread). */
#define _GNU_SOURCE
#include "ns.h"

#include <errno.h>
#include <sched.h>

int pycpt_ns_enter(int fd, int nstype)
{
	if (setns(fd, nstype) < 0)
		return -errno;
	return 0;
}
