/*
 * The network hold (see nethold.h), spoken to nf_tables over nfnetlink directly: each change
 * is one batch (NFNL_MSG_BATCH_BEGIN .. END) built here from the uapi headers, so there is no
 * library to load and nothing to fork. The rule is CRIU's own network lock's ("meta mark
 * 0xc114 accept", SOCCR_MARK): CRIU's repair packets pass at restore, everything else drops.
 *
 * Why a dormant table rather than taking links down: a link taken down loses its IPv6
 * addresses and its local routes, and CRIU records the link down, so a restore rebuilds a
 * namespace where sockets on ::1 or 127.0.0.2 cannot be bound again. Why dormant rather than
 * made and deleted each time: deleting a table waits for an RCU grace period (~12 ms here),
 * while switching the dormant flag only (un)registers two hooks (~0.1 ms).
 *
 * No malloc or stdio on the pycpt_nethold_here() path: the container's init runs it after
 * fork() of a possibly threaded process.
 */
#define _GNU_SOURCE
#include "nethold.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netlink.h>

#define SOCCR_MARK 0xC114 /* the mark CRIU's repair packets carry (criu/soccr) */
#define NFT_TYPE(x) ((NFNL_SUBSYS_NFTABLES << 8) | (x))

/* --- building messages into a caller's buffer ----------------------------------------- */

struct msg {
	char *buf;
	size_t cap, len;
	int err;
	uint32_t seq;
};

static void *put(struct msg *m, size_t n)
{
	size_t aligned = NLMSG_ALIGN(n);
	void *p;

	if (m->err || m->len + aligned > m->cap) {
		m->err = ENOBUFS;
		return NULL;
	}
	p = m->buf + m->len;
	memset(p, 0, aligned);
	m->len += aligned;
	return p;
}

/* A netlink header and nfgenmsg; `subsys_res` is the batch markers' res_id. */
static struct nlmsghdr *begin(struct msg *m, uint16_t type, uint16_t flags, uint8_t family,
			      uint16_t subsys_res)
{
	struct nlmsghdr *h = put(m, sizeof(*h));
	struct nfgenmsg *g = put(m, sizeof(*g));

	if (!h || !g)
		return NULL;
	h->nlmsg_type = type;
	h->nlmsg_flags = (uint16_t)(NLM_F_REQUEST | flags);
	h->nlmsg_seq = m->seq++;
	g->nfgen_family = family;
	g->version = NFNETLINK_V0;
	g->res_id = htons(subsys_res);
	return h;
}

static void end(struct msg *m, struct nlmsghdr *h)
{
	if (h && !m->err)
		h->nlmsg_len = (uint32_t)(m->buf + m->len - (char *)h);
}

static void attr(struct msg *m, uint16_t type, const void *data, size_t n)
{
	struct nlattr *a = put(m, NLA_HDRLEN + n);

	if (a) {
		a->nla_type = type;
		a->nla_len = (uint16_t)(NLA_HDRLEN + n);
		memcpy((char *)a + NLA_HDRLEN, data, n);
	}
}

static void attr_str(struct msg *m, uint16_t type, const char *s)
{
	attr(m, type, s, strlen(s) + 1);
}

static void attr_be32(struct msg *m, uint16_t type, uint32_t v)
{
	v = htonl(v);
	attr(m, type, &v, sizeof(v));
}

static struct nlattr *nest(struct msg *m, uint16_t type)
{
	struct nlattr *a = put(m, NLA_HDRLEN);

	if (a)
		a->nla_type = type | NLA_F_NESTED;
	return a;
}

static void nest_end(struct msg *m, struct nlattr *a)
{
	if (a && !m->err)
		a->nla_len = (uint16_t)(m->buf + m->len - (char *)a);
}

/* --- the hold's messages ---------------------------------------------------------------- */

static void table_msg(struct msg *m, int type, uint16_t flags, int with_flags, uint32_t tflags)
{
	struct nlmsghdr *h = begin(m, NFT_TYPE(type), flags, NFPROTO_INET, 0);

	attr_str(m, NFTA_TABLE_NAME, PYCPT_NETHOLD_TABLE);
	if (with_flags)
		attr_be32(m, NFTA_TABLE_FLAGS, tflags);
	end(m, h);
}

static void chain_msg(struct msg *m, const char *name, uint32_t hook)
{
	struct nlmsghdr *h = begin(m, NFT_TYPE(NFT_MSG_NEWCHAIN), NLM_F_CREATE | NLM_F_ACK,
				   NFPROTO_INET, 0);
	struct nlattr *hk;

	attr_str(m, NFTA_CHAIN_TABLE, PYCPT_NETHOLD_TABLE);
	attr_str(m, NFTA_CHAIN_NAME, name);
	hk = nest(m, NFTA_CHAIN_HOOK);
	attr_be32(m, NFTA_HOOK_HOOKNUM, hook);
	attr_be32(m, NFTA_HOOK_PRIORITY, 0);
	nest_end(m, hk);
	attr_str(m, NFTA_CHAIN_TYPE, "filter");
	attr_be32(m, NFTA_CHAIN_POLICY, NF_DROP);
	end(m, h);
}

/* "meta mark 0xc114 accept": load the mark into register 1, compare, accept */
static void rule_msg(struct msg *m, const char *chain)
{
	struct nlmsghdr *h = begin(m, NFT_TYPE(NFT_MSG_NEWRULE),
				   NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK, NFPROTO_INET, 0);
	uint32_t mark = SOCCR_MARK; /* registers hold the mark in host order */
	struct nlattr *list, *elem, *data, *value, *verdict;

	attr_str(m, NFTA_RULE_TABLE, PYCPT_NETHOLD_TABLE);
	attr_str(m, NFTA_RULE_CHAIN, chain);
	list = nest(m, NFTA_RULE_EXPRESSIONS);

	elem = nest(m, NFTA_LIST_ELEM);
	attr_str(m, NFTA_EXPR_NAME, "meta");
	data = nest(m, NFTA_EXPR_DATA);
	attr_be32(m, NFTA_META_DREG, NFT_REG_1);
	attr_be32(m, NFTA_META_KEY, NFT_META_MARK);
	nest_end(m, data);
	nest_end(m, elem);

	elem = nest(m, NFTA_LIST_ELEM);
	attr_str(m, NFTA_EXPR_NAME, "cmp");
	data = nest(m, NFTA_EXPR_DATA);
	attr_be32(m, NFTA_CMP_SREG, NFT_REG_1);
	attr_be32(m, NFTA_CMP_OP, NFT_CMP_EQ);
	value = nest(m, NFTA_CMP_DATA);
	attr(m, NFTA_DATA_VALUE, &mark, sizeof(mark));
	nest_end(m, value);
	nest_end(m, data);
	nest_end(m, elem);

	elem = nest(m, NFTA_LIST_ELEM);
	attr_str(m, NFTA_EXPR_NAME, "immediate");
	data = nest(m, NFTA_EXPR_DATA);
	attr_be32(m, NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
	value = nest(m, NFTA_IMMEDIATE_DATA);
	verdict = nest(m, NFTA_DATA_VERDICT);
	attr_be32(m, NFTA_VERDICT_CODE, NF_ACCEPT);
	nest_end(m, verdict);
	nest_end(m, value);
	nest_end(m, data);
	nest_end(m, elem);

	nest_end(m, list);
	end(m, h);
}

/* --- talking to the kernel -------------------------------------------------------------- */

static int open_socket(void)
{
	struct timeval tv = {.tv_sec = 5, .tv_usec = 0}; /* the kernel answers at once */
	int sk = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);

	if (sk < 0)
		return -errno;
	if (setsockopt(sk, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0) {
		int err = -errno;

		close(sk);
		return err;
	}
	return sk;
}

/*
 * Send m and read answers until `acks` acknowledgements came or one carried an error (the
 * kernel reports every message of a failed batch, but the first error says why). A reply
 * of type NEWTABLE (to a GETTABLE) leaves its flags in *tflags.
 */
static int talk(int sk, struct msg *m, int acks, uint32_t *tflags)
{
	struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
	char reply[4096] __attribute__((aligned(NLMSG_ALIGNTO)));

	if (m->err)
		return -m->err;
	if (sendto(sk, m->buf, m->len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
		return -errno;
	while (acks > 0) {
		ssize_t n = recv(sk, reply, sizeof(reply), 0);
		struct nlmsghdr *h;

		if (n < 0)
			return errno == EAGAIN ? -ETIMEDOUT : -errno;
		for (h = (struct nlmsghdr *)reply; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_type == NLMSG_ERROR) {
				struct nlmsgerr *e = NLMSG_DATA(h);

				if (h->nlmsg_len < NLMSG_LENGTH(sizeof(*e)))
					return -EBADMSG;
				if (e->error)
					return e->error;
				acks--;
			} else if (h->nlmsg_type == NFT_TYPE(NFT_MSG_NEWTABLE) && tflags) {
				size_t off = NLMSG_LENGTH(sizeof(struct nfgenmsg));

				while (off + NLA_HDRLEN <= h->nlmsg_len) {
					struct nlattr *a = (struct nlattr *)((char *)h + off);

					if (a->nla_len < NLA_HDRLEN || off + a->nla_len > h->nlmsg_len)
						break;
					if ((a->nla_type & NLA_TYPE_MASK) == NFTA_TABLE_FLAGS &&
					    a->nla_len >= NLA_HDRLEN + sizeof(uint32_t)) {
						uint32_t v;

						memcpy(&v, (char *)a + NLA_HDRLEN, sizeof(v));
						*tflags = ntohl(v);
					}
					off += NLA_ALIGN(a->nla_len);
				}
			}
		}
	}
	return 0;
}

/* One batch: BEGIN, what fill() adds (which asks for `acks` acknowledgements), END. */
static int batch(int sk, uint32_t seq, int op, int acks)
{
	char buf[2048] __attribute__((aligned(NLMSG_ALIGNTO)));
	struct msg m = {.buf = buf, .cap = sizeof(buf), .seq = seq};
	struct nlmsghdr *h;

	h = begin(&m, NFNL_MSG_BATCH_BEGIN, 0, AF_UNSPEC, NFNL_SUBSYS_NFTABLES);
	end(&m, h);
	switch (op) {
	case PYCPT_NETHOLD_MAKE:
	case -PYCPT_NETHOLD_MAKE: /* made active: the hold was asked for and there was none */
		/* EXCL: a table of that name that is not ours must not be taken over silently */
		table_msg(&m, NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK, 1,
			  op > 0 ? NFT_TABLE_F_DORMANT : 0);
		chain_msg(&m, "input", NF_INET_LOCAL_IN);
		rule_msg(&m, "input");
		chain_msg(&m, "output", NF_INET_LOCAL_OUT);
		rule_msg(&m, "output");
		break;
	case PYCPT_NETHOLD_ON:
	case PYCPT_NETHOLD_OFF:
		/* an update of an existing table: no CREATE, so a missing one is ENOENT */
		table_msg(&m, NFT_MSG_NEWTABLE, NLM_F_ACK, 1,
			  op == PYCPT_NETHOLD_OFF ? NFT_TABLE_F_DORMANT : 0);
		break;
	case PYCPT_NETHOLD_DELETE:
		table_msg(&m, NFT_MSG_DELTABLE, NLM_F_ACK, 0, 0);
		break;
	default:
		return -EINVAL;
	}
	h = begin(&m, NFNL_MSG_BATCH_END, 0, AF_UNSPEC, NFNL_SUBSYS_NFTABLES);
	end(&m, h);
	return talk(sk, &m, acks, NULL);
}

static int query(int sk, uint32_t seq)
{
	char buf[256] __attribute__((aligned(NLMSG_ALIGNTO)));
	struct msg m = {.buf = buf, .cap = sizeof(buf), .seq = seq};
	uint32_t tflags = 0;
	int ret;

	table_msg(&m, NFT_MSG_GETTABLE, NLM_F_ACK, 0, 0);
	ret = talk(sk, &m, 1, &tflags);
	if (ret < 0)
		return ret;
	return (tflags & NFT_TABLE_F_DORMANT) ? 0 : 1;
}

int pycpt_nethold_here(int op)
{
	/* sequence numbers only need to differ between messages of one socket */
	uint32_t seq = 1;
	int sk = open_socket(), ret;

	if (sk < 0)
		return sk;
	switch (op) {
	case PYCPT_NETHOLD_MAKE:
		ret = batch(sk, seq, PYCPT_NETHOLD_MAKE, 5);
		break;
	case PYCPT_NETHOLD_ON:
	case PYCPT_NETHOLD_OFF:
	case PYCPT_NETHOLD_DELETE:
		/* nf_tables makes a table that a NEWTABLE names and does not find, CREATE flag
		 * or not: look first, or a missing hold would come back as an empty table */
		ret = query(sk, seq);
		if (ret == -ENOENT) {
			/* none: an older container, or it flushed its ruleset */
			ret = op == PYCPT_NETHOLD_ON ? batch(sk, seq + 8, -PYCPT_NETHOLD_MAKE, 5) : 0;
			if (ret >= 0)
				ret = 1;
		} else if (ret >= 0) {
			ret = batch(sk, seq + 8, op, 1);
		}
		break;
	case PYCPT_NETHOLD_QUERY:
		ret = query(sk, seq);
		break;
	default:
		ret = -EINVAL;
	}
	close(sk);
	return ret;
}

/* --- on a thread, in another network namespace ---------------------------------------- */

struct pycpt_nethold {
	pthread_t thread;
	int nsfd; /* -1: a new namespace of the thread's own (the probe) */
	int op, ret;
};

static void *hold_thread(void *arg)
{
	pycpt_nethold_t *job = arg;

	if (job->nsfd >= 0 ? setns(job->nsfd, CLONE_NEWNET) < 0 : unshare(CLONE_NEWNET) < 0) {
		job->ret = -errno;
		return NULL;
	}
	if (job->nsfd < 0) { /* the probe: make it, then wake it, as a suspend would */
		job->ret = pycpt_nethold_here(PYCPT_NETHOLD_MAKE);
		if (job->ret >= 0)
			job->ret = pycpt_nethold_here(PYCPT_NETHOLD_ON);
		return NULL;
	}
	job->ret = pycpt_nethold_here(job->op);
	return NULL;
}

static int start(int nsfd, int op, pycpt_nethold_t **out)
{
	pycpt_nethold_t *job = calloc(1, sizeof(*job));
	int ret;

	if (!job) {
		if (nsfd >= 0)
			close(nsfd);
		return -ENOMEM;
	}
	job->nsfd = nsfd;
	job->op = op;
	ret = pthread_create(&job->thread, NULL, hold_thread, job);
	if (ret) {
		if (nsfd >= 0)
			close(nsfd);
		free(job);
		return -ret;
	}
	*out = job;
	return 0;
}

int pycpt_nethold_start(int pid, int op, pycpt_nethold_t **out)
{
	char path[64];
	int nsfd;

	if (op < PYCPT_NETHOLD_MAKE || op > PYCPT_NETHOLD_QUERY || pid <= 0)
		return -EINVAL;
	snprintf(path, sizeof(path), "/proc/%d/ns/net", pid);
	nsfd = open(path, O_RDONLY | O_CLOEXEC);
	if (nsfd < 0)
		return -errno;
	return start(nsfd, op, out);
}

int pycpt_nethold_join(pycpt_nethold_t *job)
{
	int ret = pthread_join(job->thread, NULL);

	if (job->nsfd >= 0)
		close(job->nsfd);
	ret = ret ? -ret : job->ret;
	free(job);
	return ret;
}

int pycpt_nethold(int pid, int op)
{
	pycpt_nethold_t *job;
	int ret = pycpt_nethold_start(pid, op, &job);

	return ret < 0 ? ret : pycpt_nethold_join(job);
}

int pycpt_nethold_probe(void)
{
	pycpt_nethold_t *job;
	int ret = start(-1, 0, &job);

	return ret < 0 ? ret : pycpt_nethold_join(job);
}
