/* Entering namespaces: moves only the calling thread. */
#ifndef PYCPT_NS_H
#define PYCPT_NS_H

#include <sched.h>

#ifndef CLONE_NEWNET
#define CLONE_NEWNET 0x40000000
#endif
#define PYCPT_NS_NET CLONE_NEWNET

/* setns(fd, nstype): fd is an open /proc/PID/ns/... file; nstype PYCPT_NS_NET (or 0). */
int pycpt_ns_enter(int fd, int nstype);

#endif
