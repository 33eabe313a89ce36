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

/* Start a fence: a small process (a new session, signals at their defaults) that serves
 * `sock` (one end of a SOCK_SEQPACKET socketpair; the caller keeps the other) and nothing
 * else. Messages, each one packet of at most 16 bytes with descriptors attached:
 *   'H' + descriptors: hold these (the previous ones are closed);
 *   'K' + one descriptor + bytes: on the caller's death, write those bytes to it;
 *   'R': release: exit, closing everything.
 * The end of the stream without 'R' (the caller died) makes it write the 'K' bytes, then
 * exit. A migration's target uses it so that its copies of lazy-pages' userfaultfds outlive
 * it, and its copy is killed (cgroup.kill) before they close. */
int pycpt_proc_fence(int sock, int *pid_out);

#define PYCPT_FENCE_MAX_FDS 64

#endif
