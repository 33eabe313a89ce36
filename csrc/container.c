/*
 * A container's init: pid 1 of new pid, mount, uts, ipc (and, unless shared, net)
 * namespaces, session leader there, inside its cgroup before it runs a single instruction of
 * the command, stdio on its log, no other descriptor inherited.
 *
 * The caller forks a helper that forks the monitor and exits at once, so no pycpt process
 * has to stay around. The monitor unshares and forks init, and stays its parent: when init
 * ends it writes init's pid and wait status to status_fd (if >= 0) and removes the empty
 * cgroup, which is how `pycpt status` knows the exit status of a container's program.
 * Failures before exec come back through a close-on-exec pipe as an errno and a step number.
 */
#define _GNU_SOURCE
#include "container.h"
#include "nethold.h"

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>


#define OLD_ROOT ".pycpt-oldroot"

struct report {
	int step;
	int err;
	int pid; /* init's pid as the host sees it */
};

static void fail(int fd, int step)
{
	struct report r = {.step = step, .err = errno, .pid = 0};

	if (write(fd, &r, sizeof(r)) < 0) {
		/* nothing left to tell anyone */
	}
	_exit(127);
}

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, text, strlen(text));
	close(fd);
	return n < 0 ? -1 : 0;
}

static int loopback_up(void)
{
	struct ifreq ifr;
	int sk = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), ret = -1;

	if (sk < 0)
		return -1;
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(sk, SIOCGIFFLAGS, &ifr) == 0) {
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		ret = ioctl(sk, SIOCSIFFLAGS, &ifr);
	}
	close(sk);
	return ret;
}

/* Undo mountinfo's octal escapes (\040 for a space, ...) in place. */
static void unescape(char *s)
{
	char *out = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*out++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 3;
		} else {
			*out++ = *s;
		}
	}
	*out = 0;
}

/* True if a component of `path` starts with `prefix` (no allocation: after fork) */
static int has_component(const char *path, const char *prefix)
{
	size_t n = strlen(prefix);

	for (const char *p = path; p; p = strchr(p + 1, '/'))
		if (strncmp(p + 1, prefix, n) == 0)
			return 1;
	return 0;
}

/*
 * A mount of the host's that the container's copy must not keep (CRIU dumps every mount of
 * the container's namespace, and a tmpfs's whole content, so a mount that lives only for a
 * while on the host makes the container's dump or restore fail later):
 * - a namespace file bind-mounted on the host (`ip netns add` makes them under /run/netns):
 *   CRIU cannot dump a mount of another namespace ("doesn't have a proper root mount");
 * - CRIU's own temporary mounts (.criu.cgyard.*, the cgroup yard of a restore, and
 *   .criu.cgmounts.* of a dump, mounted in the host's namespace while they run) and whatever
 *   is mounted inside pycpt's work directories (.pycpt-restore-*, .pycpt-incoming-*,
 *   .pycpt-migrate-*): the copy would outlive the host's (no propagation once private),
 *   and the restore finds no mountpoint for it ("mnt-v2: Can't stat mountpoint");
 * - anything mounted below /tmp: other programs' scratch (a tmpfs being filled, a FUSE
 *   mount), whose content changes while CRIU tars it ("Can't dump tmpfs content").
 */
static int is_foreign(const char *point, const char *fstype, int rooted)
{
	if (strncmp(fstype, "nsfs ", 5) == 0)
		return 1;
	/* a rooted container keeps only its root's mounts, which may well lie below /tmp */
	return !rooted && (strncmp(point, "/tmp/", 5) == 0 || has_component(point, ".criu.") ||
			   has_component(point, ".pycpt-"));
}

/* Detach every mount is_foreign() names from this (private) copy of the host's mounts. */
static int detach_foreign_mounts(int rooted)
{
	/* no malloc or stdio here: this runs after fork() of a possibly threaded process */
	static char table[1 << 20];
	char point[4096], *line, *next, *sep;
	int found;

	do {
		ssize_t n, len = 0;
		int f = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);

		if (f < 0)
			return -1;
		while (len < (ssize_t)sizeof(table) - 1 &&
		       (n = read(f, table + len, sizeof(table) - 1 - len)) > 0)
			len += n;
		close(f);
		table[len] = 0;
		found = 0;
		for (line = table; line && *line; line = next) {
			next = strchr(line, '\n');
			if (next)
				*next++ = 0;
			sep = strstr(line, " - ");
			if (!sep || sscanf(line, "%*s %*s %*s %*s %4095s", point) != 1)
				continue;
			unescape(point);
			if (!is_foreign(point, sep + 3, rooted))
				continue;
			/* a child goes with its parent; then this one fails, harmlessly */
			if (umount2(point, MNT_DETACH) == 0)
				found = 1; /* another may be stacked below: read the table again */
		}
	} while (found);
	return 0;
}

/* Close every descriptor from 3 up except the (up to three) given ones. */
static void close_all_but(int a, int b, int c)
{
	int keep[3] = {a, b, c}, i, j, t, from = 3;

	for (i = 0; i < 3; i++) /* sort: three elements */
		for (j = i + 1; j < 3; j++)
			if (keep[j] < keep[i]) {
				t = keep[i];
				keep[i] = keep[j];
				keep[j] = t;
			}
	for (i = 0; i < 3; i++) {
		if (keep[i] < from)
			continue;
		if (keep[i] > from)
			syscall(SYS_close_range, from, keep[i] - 1, 0);
		from = keep[i] + 1;
	}
	syscall(SYS_close_range, from, ~0U, 0);
}

/* "<number> " into buf; returns the length (no stdio after fork) */
static int put_int(char *buf, long v)
{
	char tmp[24];
	int n = 0, len = 0;

	if (v < 0) {
		buf[len++] = '-';
		v = -v;
	}
	do
		tmp[n++] = (char)('0' + v % 10);
	while ((v /= 10) && n < (int)sizeof(tmp));
	while (n)
		buf[len++] = tmp[--n];
	buf[len++] = ' ';
	return len;
}

/* What the monitor runs once init started, where perl is (perl-base is Essential on Debian):
 * the same as the C below, in about 0.5 MB of its own instead of the ~16 MB of the Python
 * process this one was forked from. */
#define MONITOR_PERL "/usr/bin/perl"
static const char monitor_script[] =
	"my ($pid, $fd, $dir, $ct) = @ARGV; $0 = \"pycpt-monitor $ct\"; my $r;"
	"1 while (($r = waitpid($pid, 0)) == -1 && $! == 4);"
	"if ($r == $pid && $fd >= 0 && open(my $f, '>&=', $fd)) { syswrite($f, \"$pid $?\\n\") }"
	"rmdir($dir);";

/* The monitor's life after init started: wait for it, record its end, remove its cgroup
 * (empty by then: the kernel ends every task of a pid namespace before its init is
 * reaped). Never returns. */
static void monitor(pid_t init, int status_fd, const char *cgroup_procs, const char *ct)
{
	char line[64], dir[4096], pid_arg[24], fd_arg[24];
	int status, len;
	size_t n;

	n = strlen(cgroup_procs);
	dir[0] = 0;
	if (n < sizeof(dir) && n > sizeof("/cgroup.procs")) {
		memcpy(dir, cgroup_procs, n - (sizeof("/cgroup.procs") - 1));
		dir[n - (sizeof("/cgroup.procs") - 1)] = 0;
	}
	if (access(MONITOR_PERL, X_OK) == 0 && (status_fd < 0 || fcntl(status_fd, F_SETFD, 0) == 0)) {
		char *const env[] = {"PATH=/usr/bin:/bin", NULL};
		char *args[] = {"pycpt-monitor", "-e", (char *)monitor_script, pid_arg, fd_arg, dir,
				(char *)ct, NULL};

		pid_arg[put_int(pid_arg, init) - 1] = 0;
		fd_arg[put_int(fd_arg, status_fd) - 1] = 0;
		execve(MONITOR_PERL, args, env);
	}
	while (waitpid(init, &status, 0) < 0)
		if (errno != EINTR)
			_exit(1);
	if (status_fd >= 0) {
		len = put_int(line, init);
		len += put_int(line + len, status);
		line[len - 1] = '\n';
		if (write(status_fd, line, len) < 0) {
			/* nobody to tell */
		}
	}
	if (dir[0])
		rmdir(dir); /* fails, harmlessly, if something else is still in there */
	_exit(0);
}

/* Runs as pid 1 of the new namespaces; never returns. */
static void run_init(int fd, char *const argv[], char *const envp[], const char *cgroup_procs,
		     const char *log_path, const char *hostname, const char *root, int flags)
{
	int log, nul[2];

	if (setsid() < 0)
		fail(fd, PYCPT_CT_STEP_SETUP);
	if (write_file(cgroup_procs, "0") < 0) /* "0": the writer itself */
		fail(fd, PYCPT_CT_STEP_CGROUP);
	/* our mounts must not leak to the host, nor the host's later mounts to us */
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ||
	    detach_foreign_mounts(root && root[0]) < 0)
		fail(fd, PYCPT_CT_STEP_MOUNTS);
	/* its own /dev/shm (POSIX shared memory of its own): CRIU saves a tmpfs's content, and
	 * the host's may be large and busy */
	if (!(root && root[0]) && access("/dev/shm", F_OK) == 0) {
		while (umount2("/dev/shm", MNT_DETACH) == 0)
			; /* the host's, however many are stacked there */
		if (mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
			fail(fd, PYCPT_CT_STEP_MOUNTS);
	}
	if (root && root[0]) {
		/* pivot_root, not chroot: the mount namespace must hold nothing but the root (CRIU
		 * dumps every mount of it), so the host's tree is detached afterwards */
		if (mount(root, root, NULL, MS_BIND | MS_REC, NULL) < 0 || chdir(root) < 0 ||
		    (mkdir(OLD_ROOT, 0700) < 0 && errno != EEXIST) ||
		    syscall(SYS_pivot_root, ".", OLD_ROOT) < 0 || chdir("/") < 0)
			fail(fd, PYCPT_CT_STEP_ROOT);
	}
	/* the log path is inside the root for a rooted container; stdin reads end-of-file;
	 * never through a symlink (root must not append a container's output elsewhere) */
	log = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (log < 0 || dup2(log, 1) < 0 || dup2(log, 2) < 0 || pipe(nul) < 0 ||
	    close(nul[1]) < 0 || dup2(nul[0], 0) < 0 || close(nul[0]) < 0)
		fail(fd, PYCPT_CT_STEP_LOG);
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL) < 0)
		fail(fd, PYCPT_CT_STEP_PROC);
	if (root && root[0] && (umount2(OLD_ROOT, MNT_DETACH) < 0 || rmdir(OLD_ROOT) < 0))
		fail(fd, PYCPT_CT_STEP_ROOT);
	if (!(flags & PYCPT_CT_SHARE_NET)) {
		if (loopback_up() < 0)
			fail(fd, PYCPT_CT_STEP_LO);
		/* the network hold, asleep until a suspend wakes it (nethold.h); without
		 * nf_tables the container still runs, and its first suspend says why it cannot */
		pycpt_nethold_here(PYCPT_NETHOLD_MAKE);
	}
	if (sethostname(hostname, strlen(hostname)) < 0)
		fail(fd, PYCPT_CT_STEP_HOSTNAME);
	if (chdir("/") < 0)
		fail(fd, PYCPT_CT_STEP_ROOT);
	/* nothing but stdio and the report pipe (close-on-exec) crosses into the container */
	if (fd > 3)
		syscall(SYS_close_range, 3, fd - 1, 0);
	syscall(SYS_close_range, fd + 1, ~0U, 0);
	execve(argv[0], argv, envp); /* argv[0] is an absolute path: execvpe may allocate */
	fail(fd, PYCPT_CT_STEP_EXEC);
}

int pycpt_container_spawn(char *const argv[], char *const envp[], const char *cgroup_procs,
			  const char *log_path, const char *hostname, const char *root,
			  int flags, int status_fd, int netns_fd, int *pid_out, int *step_out)
{
	int nsflags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC, pipefd[2];
	struct report r = {0, 0, 0};
	pid_t helper, init;
	ssize_t n;
	int status;

	/* netns_fd: a namespace the caller made and wired (its NICs) before any process of the
	 * container exists; it is joined instead of an empty one being made */
	if ((flags & PYCPT_CT_SHARE_NET) && netns_fd >= 0)
		return -EINVAL;
	if (!(flags & PYCPT_CT_SHARE_NET) && netns_fd < 0)
		nsflags |= CLONE_NEWNET;
	if (pipe2(pipefd, O_CLOEXEC) < 0)
		return -errno;
	helper = fork();
	if (helper < 0) {
		int err = -errno;

		close(pipefd[0]);
		close(pipefd[1]);
		return err;
	}
	if (helper == 0) {
		close(pipefd[0]);
		/* the monitor: a grandchild, so that the caller only waits for the helper */
		helper = fork();
		if (helper < 0)
			fail(pipefd[1], PYCPT_CT_STEP_SETUP);
		if (helper > 0)
			_exit(0);
		/* out of the caller's session (its Ctrl-C), without its descriptors (a lock, the
		 * reading end of its stdout...) */
		if (setsid() < 0)
			fail(pipefd[1], PYCPT_CT_STEP_SETUP);
		close_all_but(pipefd[1], status_fd, netns_fd);
		{
			int nul = open("/dev/null", O_RDWR | O_CLOEXEC);

			if (nul < 0 || dup2(nul, 0) < 0 || dup2(nul, 1) < 0 || dup2(nul, 2) < 0)
				fail(pipefd[1], PYCPT_CT_STEP_SETUP);
			close(nul);
		}
		if (netns_fd >= 0) {
			if (setns(netns_fd, CLONE_NEWNET) < 0)
				fail(pipefd[1], PYCPT_CT_STEP_NET);
			close(netns_fd);
		}
		if (unshare(nsflags) < 0)
			fail(pipefd[1], PYCPT_CT_STEP_SETUP);
		init = fork();
		if (init < 0)
			fail(pipefd[1], PYCPT_CT_STEP_SETUP);
		if (init == 0)
			run_init(pipefd[1], argv, envp, cgroup_procs, log_path, hostname, root, flags);
		r.pid = init;
		if (write(pipefd[1], &r, sizeof(r)) < 0)
			_exit(1);
		close(pipefd[1]);
		monitor(init, status_fd, cgroup_procs, hostname);
	}
	close(pipefd[1]);
	while (waitpid(helper, &status, 0) < 0 && errno == EINTR)
		;
	/* first the helper's report (init's pid), then init's failure if any: EOF means exec */
	*step_out = 0;
	n = read(pipefd[0], &r, sizeof(r));
	if (n == sizeof(r) && !r.step) {
		*pid_out = r.pid;
		n = read(pipefd[0], &r, sizeof(r));
		if (n == 0) {
			close(pipefd[0]);
			return 0; /* EOF: init exec'd the command */
		}
	}
	close(pipefd[0]);
	if (n != sizeof(r))
		return -EIO;
	*step_out = r.step;
	return -(r.err ? r.err : EIO);
}

/* In the network namespace of `pid`: with up == 0, take every interface that is up down and
 * list their names in buf (one per line); with up == 1, bring up the interfaces listed in
 * buf. The work runs on a thread of its own: setns(CLONE_NEWNET) moves only the calling
 * thread, and a thread is far cheaper to start than a process on this hot path. */
struct links_job {
	int nsfd, up, err;
	char *buf;
	size_t cap;
	int len;
};

static void *links_thread(void *arg)
{
	struct links_job *job = arg;
	struct ifreq ifr;
	int sk;

	if (setns(job->nsfd, CLONE_NEWNET) < 0 ||
	    (sk = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0) {
		job->err = errno;
		return NULL;
	}
	if (job->up) {
		for (char *name = job->buf, *end; *name; name = end + 1) {
			end = strchr(name, '\n');
			if (!end)
				break;
			memset(&ifr, 0, sizeof(ifr));
			memcpy(ifr.ifr_name, name, (size_t)(end - name) < IFNAMSIZ - 1
			       ? (size_t)(end - name) : IFNAMSIZ - 1);
			if (ioctl(sk, SIOCGIFFLAGS, &ifr) == 0) {
				ifr.ifr_flags |= IFF_UP;
				if (ioctl(sk, SIOCSIFFLAGS, &ifr) < 0)
					job->err = errno;
			}
		}
		close(sk);
		return NULL;
	}
	struct if_nameindex *all = if_nameindex(), *i;

	job->len = 0;
	job->buf[0] = '\0';
	if (!all) {
		job->err = errno;
		close(sk);
		return NULL;
	}
	for (i = all; i->if_index; i++) {
		size_t n = strlen(i->if_name);

		memset(&ifr, 0, sizeof(ifr));
		strncpy(ifr.ifr_name, i->if_name, IFNAMSIZ - 1);
		if (ioctl(sk, SIOCGIFFLAGS, &ifr) < 0 || !(ifr.ifr_flags & IFF_UP))
			continue;
		ifr.ifr_flags &= ~IFF_UP;
		if (ioctl(sk, SIOCSIFFLAGS, &ifr) < 0) {
			job->err = errno;
			continue;
		}
		if ((size_t)job->len + n + 2 > job->cap) {
			job->err = ENOBUFS;
			continue;
		}
		memcpy(job->buf + job->len, i->if_name, n);
		job->len += (int)n;
		job->buf[job->len++] = '\n';
		job->buf[job->len] = '\0';
	}
	if_freenameindex(all);
	close(sk);
	return NULL;
}

/* The job of pycpt_container_links_start(): its thread and what it works on. */
struct pycpt_links {
	pthread_t thread;
	struct links_job job;
};

int pycpt_container_links_start(int pid, int up, char *buf, size_t cap, pycpt_links_t **out)
{
	char path[64];
	pycpt_links_t *l;
	int ret;

	if (cap < 2)
		return -EINVAL;
	l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->job.up = up;
	l->job.buf = buf;
	l->job.cap = cap;
	snprintf(path, sizeof(path), "/proc/%d/ns/net", pid);
	l->job.nsfd = open(path, O_RDONLY | O_CLOEXEC);
	if (l->job.nsfd < 0) {
		ret = -errno;
		free(l);
		return ret;
	}
	ret = pthread_create(&l->thread, NULL, links_thread, &l->job);
	if (ret) {
		close(l->job.nsfd);
		free(l);
		return -ret;
	}
	*out = l;
	return 0;
}

int pycpt_container_links_join(pycpt_links_t *l, int *len)
{
	int ret = pthread_join(l->thread, NULL);

	close(l->job.nsfd);
	if (!ret) {
		*len = l->job.len;
		ret = l->job.err;
	}
	free(l);
	return -ret;
}

int pycpt_container_links(int pid, int up, char *buf, size_t cap, int *len)
{
	pycpt_links_t *l;
	int ret = pycpt_container_links_start(pid, up, buf, cap, &l);

	return ret < 0 ? ret : pycpt_container_links_join(l, len);
}
