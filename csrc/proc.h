/* Other processes: descriptors taken from them, and dying with our caller. */
#ifndef PYCPT_PROC_H
#define PYCPT_PROC_H

/* A copy of descriptor `fd` of the process behind `pidfd` (pidfd_getfd), close-on-exec;
 * returns the new descriptor or -errno. */
int pycpt_proc_getfd(int pidfd, int fd);

/* For a child about to exec (subprocess's preexec_fn): PR_SET_PDEATHSIG(SIGKILL), so that it
 * dies with the thread that started it; -ESRCH if its parent is no longer `parent` (it died
 * before the flag was set). */
int pycpt_proc_die_with_parent(int parent);

#endif
