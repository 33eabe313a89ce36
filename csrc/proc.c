/* Other processes: descriptors taken from them (pidfd_getfd), and dying with our caller. */
#define _GNU_SOURCE
#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
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

static void close_all(int *fds, int *n)
{
	while (*n > 0)
		close(fds[--*n]);
}

/* The fence's whole life (async-signal-safe calls only: it is a fork of a threaded
 * process). */
static void fence_serve(int sock)
{
	int held[PYCPT_FENCE_MAX_FDS], nheld = 0, killfd = -1;
	char kill_bytes[16];
	size_t kill_len = 0;

	for (;;) {
		union {
			char buf[CMSG_SPACE(sizeof(int) * PYCPT_FENCE_MAX_FDS)];
			struct cmsghdr align;
		} ctl;
		char msg[16];
		struct iovec iov = {.iov_base = msg, .iov_len = sizeof(msg)};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
				   .msg_controllen = sizeof(ctl.buf)};
		int got[PYCPT_FENCE_MAX_FDS], ngot = 0;
		ssize_t n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);

		if (n < 0 && errno == EINTR)
			continue;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); n > 0 && c; c = CMSG_NXTHDR(&m, c)) {
			if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
				continue;
			int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			for (int i = 0; i < k && ngot < PYCPT_FENCE_MAX_FDS; i++)
				memcpy(&got[ngot++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
		}
		if (n <= 0) {
			/* the caller is gone without releasing us: what it guarded must not go on
			 * before the descriptors we hold close (with us, right after) */
			if (killfd >= 0 && kill_len > 0)
				while (write(killfd, kill_bytes, kill_len) < 0 && errno == EINTR)
					;
			_exit(0);
		}
		switch (msg[0]) {
		case 'H':
			close_all(held, &nheld);
			memcpy(held, got, sizeof(int) * ngot);
			nheld = ngot;
			ngot = 0;
			break;
		case 'K':
			if (ngot >= 1) {
				if (killfd >= 0)
					close(killfd);
				killfd = got[0];
				got[0] = got[--ngot];
				kill_len = (size_t)n - 1;
				memcpy(kill_bytes, msg + 1, kill_len);
			}
			break;
		case 'R':
			_exit(0);
		default:
			break;
		}
		close_all(got, &ngot);
	}
}

int pycpt_proc_fence(int sock, int *pid_out)
{
	sigset_t all, old;
	pid_t pid;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pid = fork();
	if (pid == 0) {
		struct sigaction sa;

		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = SIG_DFL;
		for (int sig = 1; sig < NSIG; sig++)
			sigaction(sig, &sa, NULL); /* none of the parent's handlers may run here */
		sa.sa_handler = SIG_IGN;
		sigaction(SIGPIPE, &sa, NULL);
		setsid(); /* a signal to the caller's process group is not for us */
		prctl(PR_SET_NAME, "pycpt-fence");
		if (sock != 3 && dup2(sock, 3) < 0)
			_exit(127);
		syscall(SYS_close_range, 4, ~0U, 0);
		/* nor any of the caller's pipes: its peers must see them close when it dies */
		int null = open("/dev/null", O_RDWR);
		if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0)
			_exit(127);
		if (null > 3)
			close(null);
		sigprocmask(SIG_SETMASK, &old, NULL);
		fence_serve(3);
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (pid < 0)
		return -errno;
	*pid_out = pid;
	return 0;
}
