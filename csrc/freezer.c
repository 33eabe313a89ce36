/* cgroup freezer: freeze, thaw, state and kill for cgroup v1 and v2.
 *
 * v2 announces state changes on cgroup.events (POLLPRI), so waits there sleep in ppoll. But
 * the kernel rate-limits those notifications (cgroup_file_notify: one per 10 ms or so, measured
 * up to 12 ms late here), so each sleep is also capped by the back-off below and the file is
 * re-read; it costs one cheap read per step. v1 announces nothing (no POLLPRI, no inotify on
 * freezer.state), and it is the read of freezer.state that moves FREEZING to FROZEN, so v1
 * waits re-read with the growing back-off alone.
 */
#define _GNU_SOURCE
#include "freezer.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

/* First re-read delay: v1 polls, so start small; v2 normally wakes on POLLPRI, and re-reading
 * early would only take CPU from the tasks that must run to freeze. */
#define V1_FIRST_BACKOFF_NS 2000
#define V2_FIRST_BACKOFF_NS 50000
#define FIRST_BACKOFF_NS(f) ((f)->events >= 0 ? V2_FIRST_BACKOFF_NS : V1_FIRST_BACKOFF_NS)

struct pycpt_freezer {
	int version;
	int dir;    /* the cgroup directory (O_PATH) */
	int ctl;    /* v1 freezer.state, v2 cgroup.freeze */
	int events; /* v2 cgroup.events; -1 on v1 */
	int self;   /* v1 freezer.self_freezing; -1 on v2 */
};

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* -1 means no deadline. */
static int64_t deadline_after(int timeout_ms)
{
	return timeout_ms < 0 ? -1 : now_ns() + (int64_t)timeout_ms * 1000000;
}

void pycpt_freezer_close(pycpt_freezer_t *f)
{
	if (!f)
		return;
	if (f->events >= 0)
		close(f->events);
	if (f->self >= 0)
		close(f->self);
	if (f->ctl >= 0)
		close(f->ctl);
	if (f->dir >= 0)
		close(f->dir);
	free(f);
}

int pycpt_freezer_open(const char *cgroup, int version, pycpt_freezer_t **out)
{
	pycpt_freezer_t *f;
	int err;

	if (version != 1 && version != 2)
		return -EINVAL;
	f = malloc(sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->version = version;
	f->ctl = f->events = f->self = -1;
	f->dir = open(cgroup, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (f->dir < 0)
		goto fail;
	f->ctl = openat(f->dir, version == 1 ? "freezer.state" : "cgroup.freeze",
			O_RDWR | O_CLOEXEC);
	if (f->ctl < 0)
		goto fail;
	if (version == 2)
		f->events = openat(f->dir, "cgroup.events", O_RDONLY | O_CLOEXEC);
	else
		f->self = openat(f->dir, "freezer.self_freezing", O_RDONLY | O_CLOEXEC);
	if (f->events < 0 && f->self < 0)
		goto fail;
	*out = f;
	return 0;
fail:
	err = -errno;
	pycpt_freezer_close(f);
	return err;
}

/* kernfs files must be read from offset 0 to get a fresh value. */
static int read_at0(int fd, char *buf, size_t size)
{
	ssize_t n = pread(fd, buf, size - 1, 0);

	if (n < 0)
		return -errno;
	buf[n] = '\0';
	return 0;
}

static int write_at0(int fd, const char *s)
{
	size_t len = strlen(s);
	ssize_t n = pwrite(fd, s, len, 0);

	if (n < 0)
		return -errno;
	return (size_t)n == len ? 0 : -EIO;
}

/* Value of `key` in a "key value\n" list such as cgroup.events. */
static int events_value(int fd, const char *key, int *value)
{
	char buf[256];
	size_t klen = strlen(key);
	int ret = read_at0(fd, buf, sizeof(buf));

	if (ret)
		return ret;
	for (const char *line = buf, *nl; *line; line = nl + 1) {
		if (strncmp(line, key, klen) == 0 && line[klen] == ' ') {
			*value = line[klen + 1] == '1';
			return 0;
		}
		nl = strchr(line, '\n');
		if (!nl)
			break;
	}
	return -ENODATA;
}

static int fz_state(pycpt_freezer_t *f, int *state)
{
	char buf[32];
	int ret, frozen, wanted;

	if (f->version == 1) {
		ret = read_at0(f->ctl, buf, sizeof(buf));
		if (ret)
			return ret;
		if (strncmp(buf, "FROZEN", 6) == 0)
			*state = PYCPT_FREEZER_FROZEN;
		else if (strncmp(buf, "FREEZING", 8) == 0)
			*state = PYCPT_FREEZER_FREEZING;
		else if (strncmp(buf, "THAWED", 6) == 0)
			*state = PYCPT_FREEZER_THAWED;
		else
			return -EPROTO;
		return 0;
	}
	ret = events_value(f->events, "frozen", &frozen);
	if (ret)
		return ret;
	if (frozen) {
		*state = PYCPT_FREEZER_FROZEN;
		return 0;
	}
	ret = read_at0(f->ctl, buf, sizeof(buf));
	if (ret)
		return ret;
	wanted = buf[0] == '1';
	*state = wanted ? PYCPT_FREEZER_FREEZING : PYCPT_FREEZER_THAWED;
	return 0;
}

/* Whether this cgroup itself asks to be frozen (not an ancestor), to roll back to. */
static int fz_requested(pycpt_freezer_t *f, int *on)
{
	char buf[16];
	int ret = read_at0(f->version == 1 ? f->self : f->ctl, buf, sizeof(buf));

	if (ret == 0)
		*on = buf[0] == '1';
	return ret;
}

static int fz_request(pycpt_freezer_t *f, int on)
{
	if (f->version == 1)
		return write_at0(f->ctl, on ? "FROZEN" : "THAWED");
	return write_at0(f->ctl, on ? "1" : "0");
}

static void sleep_ns(int64_t ns)
{
	struct timespec ts = { .tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000 };

	nanosleep(&ts, NULL); /* EINTR: the caller re-checks and sleeps again */
}

/* Next back-off step (x1.5, capped), never past the deadline. */
static int64_t backoff_step(int64_t *backoff, int64_t deadline)
{
	int64_t step = *backoff;

	*backoff += *backoff / 2;
	if (*backoff > PYCPT_FREEZER_MAX_BACKOFF_NS)
		*backoff = PYCPT_FREEZER_MAX_BACKOFF_NS;
	if (deadline >= 0 && step > deadline - now_ns())
		step = deadline - now_ns();
	return step < 0 ? 0 : step;
}

/* Sleep one back-off step; on v2 wake up early when cgroup.events is signalled. */
static int nap(pycpt_freezer_t *f, int64_t *backoff, int64_t deadline)
{
	int64_t step = backoff_step(backoff, deadline);

	if (f->events < 0) {
		sleep_ns(step);
		return 0;
	}
	struct pollfd pfd = { .fd = f->events, .events = POLLPRI };
	struct timespec ts = { .tv_sec = step / 1000000000, .tv_nsec = step % 1000000000 };

	if (ppoll(&pfd, 1, &ts, NULL) < 0 && errno != EINTR)
		return -errno;
	return 0;
}

/* The default 50 us timer slack would swamp the first micro-second steps; returns the old. */
static int slack_begin(void)
{
	int slack = prctl(PR_GET_TIMERSLACK);

	if (slack > 1)
		prctl(PR_SET_TIMERSLACK, 1UL);
	return slack;
}

static void slack_end(int slack)
{
	if (slack > 1)
		prctl(PR_SET_TIMERSLACK, (unsigned long)slack);
}

static bool expired(int64_t deadline)
{
	return deadline >= 0 && now_ns() >= deadline;
}

/* Wait until the kernel reports `want`: FROZEN or THAWED. */
static int fz_wait_state(pycpt_freezer_t *f, int want, int64_t deadline)
{
	int64_t backoff = FIRST_BACKOFF_NS(f);
	int ret, state, slack = slack_begin();

	for (;;) {
		if (f->version == 2) {
			int frozen;

			ret = events_value(f->events, "frozen", &frozen);
			state = frozen ? PYCPT_FREEZER_FROZEN : PYCPT_FREEZER_THAWED;
		} else {
			ret = fz_state(f, &state);
		}
		if (ret || state == want)
			break;
		if (expired(deadline)) {
			ret = -ETIMEDOUT;
			break;
		}
		ret = nap(f, &backoff, deadline);
		if (ret)
			break;
	}
	slack_end(slack);
	return ret;
}

/* Ask for `on`, wait for the kernel to report it, and undo the request on timeout. */
static int fz_change(pycpt_freezer_t *f, int on, int timeout_ms, int64_t *elapsed_ns)
{
	int64_t t0, deadline;
	int ret, before;

	ret = fz_requested(f, &before);
	if (ret)
		return ret;
	t0 = now_ns();
	deadline = deadline_after(timeout_ms);
	ret = fz_request(f, on);
	if (ret == 0)
		ret = fz_wait_state(f, on ? PYCPT_FREEZER_FROZEN : PYCPT_FREEZER_THAWED, deadline);
	*elapsed_ns = now_ns() - t0;
	if (ret && before != on)
		fz_request(f, before); /* put it back; the first error is what the caller hears */
	return ret;
}

int pycpt_freezer_freeze(pycpt_freezer_t *f, int timeout_ms, int64_t *elapsed_ns)
{
	return fz_change(f, 1, timeout_ms, elapsed_ns);
}

int pycpt_freezer_thaw(pycpt_freezer_t *f, int timeout_ms, int64_t *elapsed_ns)
{
	return fz_change(f, 0, timeout_ms, elapsed_ns);
}

int pycpt_freezer_state(pycpt_freezer_t *f, int *state)
{
	return fz_state(f, state);
}

/* What was asked of the freezer (1: frozen), as opposed to the state reached. */
int pycpt_freezer_requested(pycpt_freezer_t *f, int *frozen)
{
	return fz_requested(f, frozen);
}

/* SIGKILL every pid in cgroup.procs; count and sum tell whether the list changed. */
static int kill_listed(int dir, long *count, long *sum)
{
	char buf[4096];
	long pid = -1;
	ssize_t n;
	int fd = openat(dir, "cgroup.procs", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	*count = *sum = 0;
	while ((n = read(fd, buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR)) {
		for (ssize_t i = 0; i < n; i++) {
			if (buf[i] >= '0' && buf[i] <= '9') {
				pid = (pid < 0 ? 0 : pid * 10) + (buf[i] - '0');
			} else if (pid >= 0) {
				kill((pid_t)pid, SIGKILL); /* ESRCH: it died by itself */
				++*count;
				*sum += pid;
				pid = -1;
			}
		}
	}
	if (n < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	if (pid >= 0) {
		kill((pid_t)pid, SIGKILL);
		++*count;
		*sum += pid;
	}
	close(fd);
	return 0;
}

/* kill_listed over this cgroup and every cgroup below it (a container's tree is nested);
 * count and sum cover the whole tree. */
static int kill_tree(int dir, long *count, long *sum)
{
	long sub_count, sub_sum;
	struct dirent *e;
	DIR *d;
	int ret = kill_listed(dir, count, sum), fd;

	if (ret)
		return ret;
	fd = openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	d = fdopendir(fd);
	if (!d) {
		ret = -errno;
		close(fd);
		return ret;
	}
	while (ret == 0 && (e = readdir(d)) != NULL) {
		if (e->d_type != DT_DIR || e->d_name[0] == '.')
			continue;
		int sub = openat(dir, e->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

		if (sub < 0)
			continue; /* removed meanwhile */
		ret = kill_tree(sub, &sub_count, &sub_sum);
		close(sub);
		*count += sub_count;
		*sum += sub_sum;
	}
	closedir(d);
	return ret;
}

/* Without cgroup.kill: freeze so nothing forks or exits, kill the (stable) list, thaw so the
 * kills take effect, then kill again whatever is still listed until the tree is empty. The
 * freeze request is put back as it was on every path. */
static int kill_by_pids(pycpt_freezer_t *f, int64_t deadline)
{
	long count = 0, sum = 0, prev_count = -1, prev_sum = -1;
	int64_t backoff = FIRST_BACKOFF_NS(f);
	int ret, before;

	ret = fz_requested(f, &before);
	if (ret)
		return ret;
	ret = fz_request(f, 1);
	while (ret == 0 && (count != prev_count || sum != prev_sum) && !expired(deadline)) {
		prev_count = count;
		prev_sum = sum;
		ret = kill_tree(f->dir, &count, &sum);
	}
	if (ret == 0)
		ret = fz_request(f, 0);
	while (ret == 0) {
		ret = kill_tree(f->dir, &count, &sum);
		if (ret || count == 0)
			break;
		if (expired(deadline))
			ret = -ETIMEDOUT;
		else
			ret = nap(f, &backoff, deadline);
	}
	fz_request(f, before);
	return ret;
}

int pycpt_freezer_kill(pycpt_freezer_t *f, int timeout_ms, int64_t *elapsed_ns)
{
	int64_t t0 = now_ns(), deadline = deadline_after(timeout_ms);
	int64_t backoff = FIRST_BACKOFF_NS(f);
	int ret, populated, slack, kfd = -1;

	if (f->version == 2) {
		kfd = openat(f->dir, "cgroup.kill", O_WRONLY | O_CLOEXEC);
		if (kfd < 0 && errno != ENOENT)
			return -errno;
	}
	slack = slack_begin();
	if (kfd < 0) {
		ret = kill_by_pids(f, deadline); /* v1, or v2 before Linux 5.14 */
		goto out;
	}
	ret = write_at0(kfd, "1");
	close(kfd);
	while (ret == 0) {
		ret = events_value(f->events, "populated", &populated);
		if (ret || !populated)
			break;
		if (expired(deadline))
			ret = -ETIMEDOUT;
		else
			ret = nap(f, &backoff, deadline);
	}
out:
	*elapsed_ns = now_ns() - t0;
	slack_end(slack);
	return ret;
}
