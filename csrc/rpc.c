/*
 * CRIU RPC transport.
 *
 * CRIU's swrk mode serves requests on an inherited SOCK_SEQPACKET socket, one protobuf
 * message per packet. These shims start it, move whole packets of any size (including a
 * descriptor CRIU may attach to a notification) and reap it. Protobuf stays in Python.
 */
#define _GNU_SOURCE
#include "rpc.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/*
 * argv is the command that runs criu (e.g. {"criu", NULL} or a loader line); "swrk" and the
 * socket's descriptor number are appended here. CRIU gets its own process group, so that a
 * Ctrl-C meant for the caller does not kill it half-way through a dump: the caller decides.
 * With PYCPT_RPC_DIE_WITH_CALLER it also gets PR_SET_PDEATHSIG(SIGKILL): a CRIU whose
 * caller died must not go on serving or holding a tree on its own (a migration's page
 * server). The signal comes when the *thread* that called this exits, so call it from a
 * thread that outlives the requests (pycpt.Criu does it from the thread that makes the
 * request, or prepare()'s). Without it CRIU outlives its caller: a dump of a container must
 * end (or fail) as CRIU ends it, since a CRIU killed half-way may leave its parasite code in
 * a task it holds. Its umask is 077 either way: its images, logs and stats may hold the
 * tree's memory and arguments.
 *
 * keep_fd (-1: none) is a descriptor of ours that CRIU inherits under the same number, such
 * as a connected page-channel socket a request names (ps.fd, `ps-socket N`): like the
 * socket's end, it stays close-on-exec here and only the child's copy loses the flag, so
 * that no other exec inherits it.
 *
 * vfork: the child borrows our memory until execve, so it only makes system calls, and
 * reports a failure through `failed` (shared with us until it exits). Signals stay blocked
 * until the child has reset every handler of ours to the default (as posix_spawn does), so
 * that none of our handlers ever runs on our memory from the child.
 */
int pycpt_rpc_spawn(char *const argv[], int stderr_fd, int keep_fd, int flags, int *sock_out,
		    int *pid_out)
{
	int sk[2], argc = 0, ret = 0;
	char fdnum[16];
	char **args;
	pid_t pid, parent = getpid();
	volatile int failed = 0;
	sigset_t all, old;

	while (argv[argc])
		argc++;
	if (argc == 0 || (keep_fd >= 0 && keep_fd <= 2)) /* 0-2 become /dev/null and stderr */
		return -EINVAL;
	/* Both ends stay close-on-exec here, so that no other thread's fork+exec can inherit
	 * CRIU's end (a copy elsewhere would hide CRIU's death from us); the child clears the
	 * flag on its own copy of the descriptor only. */
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sk) < 0)
		return -errno;
	snprintf(fdnum, sizeof(fdnum), "%d", sk[1]);

	args = calloc(argc + 3, sizeof(char *));
	if (!args) {
		ret = -ENOMEM;
		goto close_both;
	}
	memcpy(args, argv, argc * sizeof(char *));
	args[argc] = "swrk";
	args[argc + 1] = fdnum;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pid = vfork();
	if (pid == 0) {
		struct sigaction sa;
		int null;

		for (int sig = 1; sig < NSIG; sig++) {
			if (sigaction(sig, NULL, &sa) == 0 && sa.sa_handler != SIG_IGN &&
			    sa.sa_handler != SIG_DFL) {
				sa.sa_handler = SIG_DFL;
				sigaction(sig, &sa, NULL);
			}
		}
		if (sigprocmask(SIG_SETMASK, &old, NULL) < 0)
			goto child_fail;
		if ((flags & PYCPT_RPC_DIE_WITH_CALLER) && prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
			goto child_fail;
		if ((flags & PYCPT_RPC_DIE_WITH_CALLER) && getppid() != parent)
			_exit(127); /* the caller died before the line above */
		umask(077);
		if (setpgid(0, 0) < 0)
			goto child_fail;
		null = open("/dev/null", O_RDWR);
		if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0)
			goto child_fail;
		if (stderr_fd >= 0 && dup2(stderr_fd, 2) < 0)
			goto child_fail;
		if (null > 2)
			close(null);
		if (fcntl(sk[1], F_SETFD, 0) < 0)
			goto child_fail;
		if (keep_fd >= 0 && fcntl(keep_fd, F_SETFD, 0) < 0)
			goto child_fail;
		execve(args[0], args, environ);
child_fail:
		failed = errno ? errno : EINVAL;
		_exit(127);
	}
	if (pid < 0)
		ret = -errno;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (pid > 0 && failed) {
		ret = -failed;
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
	}
	free(args);
	close(sk[1]);
	if (ret < 0) {
		close(sk[0]);
		return ret;
	}
	*sock_out = sk[0];
	*pid_out = pid;
	return 0;

close_both:
	close(sk[0]);
	close(sk[1]);
	return ret;
}

/* One packet. A packet larger than the send buffer gets EMSGSIZE: grow the buffer and retry. */
int pycpt_rpc_send(int sock, const void *buf, size_t len)
{
	for (int attempt = 0; attempt < 2; attempt++) {
		ssize_t n = send(sock, buf, len, MSG_NOSIGNAL);
		if (n == (ssize_t)len)
			return 0;
		if (n >= 0)
			return -EPROTO;
		if (errno == EINTR) {
			attempt--;
			continue;
		}
		if (errno != EMSGSIZE || attempt > 0)
			return -errno;
		int size = (int)(len + 65536);
		if (setsockopt(sock, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0 &&
		    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size)) < 0)
			return -errno;
	}
	return -EMSGSIZE;
}

/*
 * Wait up to timeout_ms (-1: forever) for the next packet and return its size without
 * consuming it. A closed peer is -ECONNRESET, a timeout -ETIMEDOUT, a signal -EINTR.
 */
int pycpt_rpc_next_size(int sock, int timeout_ms)
{
	struct pollfd p = {.fd = sock, .events = POLLIN};
	ssize_t n;
	int r;

	/* EINTR goes back to the caller, so that Python can run its signal handlers */
	r = poll(&p, 1, timeout_ms);
	if (r < 0)
		return -errno;
	if (r == 0)
		return -ETIMEDOUT;
	do
		n = recv(sock, NULL, 0, MSG_PEEK | MSG_TRUNC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if (n == 0)
		return -ECONNRESET;
	return (int)n;
}

/* Take one packet into buf; a descriptor sent with it lands in *fd_out (else -1). */
int pycpt_rpc_recv(int sock, void *buf, size_t cap, int *fd_out)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = {.iov_base = buf, .iov_len = cap};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
			     .msg_controllen = sizeof(ctl.buf)};
	ssize_t n;

	*fd_out = -1;
	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if (n == 0)
		return -ECONNRESET;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			memcpy(fd_out, CMSG_DATA(c), sizeof(int));
	if (msg.msg_flags & MSG_TRUNC) {
		if (*fd_out >= 0)
			close(*fd_out);
		*fd_out = -1;
		return -EMSGSIZE;
	}
	return (int)n;
}

/*
 * Reap pid, waiting at most timeout_ms (-1: forever) without a sleep loop: a pidfd becomes
 * readable when the process exits. Returns -ETIMEDOUT if it is still running.
 */
int pycpt_rpc_wait(int pid, int timeout_ms, int *status_out)
{
	int pidfd, r, status;
	pid_t w;

	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pidfd < 0)
		return -errno;
	struct pollfd p = {.fd = pidfd, .events = POLLIN};
	r = poll(&p, 1, timeout_ms); /* EINTR goes back to the caller, as above */
	close(pidfd);
	if (r < 0)
		return -errno;
	if (r == 0)
		return -ETIMEDOUT;
	do
		w = waitpid(pid, &status, 0);
	while (w < 0 && errno == EINTR);
	if (w < 0)
		return -errno;
	*status_out = status;
	return 0;
}
