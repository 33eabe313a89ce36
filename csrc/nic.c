/*
 * A container's NIC from the host side.
 *
 * rtnetlink for the veth pair, the bridge port, addresses and routes and the hold (the
 * port's bridge state: DISABLED drops every frame both ways while the container's own link
 * keeps its carrier, so nothing CRIU records changes); packet sockets for the
 * duplicate-address probes and the announcements after a move; a raw ICMP socket for the
 * RFC 6069 "kick" that makes a backed-off peer retransmit at once.
 * Only uapi headers: no libnl, no iproute2 at run time.
 */
#define _GNU_SOURCE
#include "nic.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if_arp.h>
#include <linux/if_bridge.h>
#include <linux/if_ether.h>
#include <linux/if_link.h>
#include <linux/if_packet.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IFA_F_NODAD
#define IFA_F_NODAD 0x02
#endif

/* --- netlink requests, built in place ---------------------------------------------------- */

struct nlreq {
	union {
		struct nlmsghdr h;
		char raw[2048];
	};
};

static unsigned next_seq(void)
{
	static unsigned seq;

	return __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED);
}

static struct rtattr *tail(struct nlreq *r)
{
	return (struct rtattr *)(r->raw + NLMSG_ALIGN(r->h.nlmsg_len));
}

/* one attribute; -EMSGSIZE sticks in r->h.nlmsg_len = 0 so that talk() refuses the request */
static void put(struct nlreq *r, unsigned short type, const void *data, size_t len)
{
	struct rtattr *a = tail(r);
	size_t need = NLMSG_ALIGN(r->h.nlmsg_len) + RTA_SPACE(len);

	if (!r->h.nlmsg_len || need > sizeof(*r)) {
		r->h.nlmsg_len = 0;
		return;
	}
	a->rta_type = type;
	a->rta_len = (unsigned short)RTA_LENGTH(len);
	if (len)
		memcpy(RTA_DATA(a), data, len);
	r->h.nlmsg_len = (uint32_t)need;
}

static struct rtattr *nest(struct nlreq *r, unsigned short type)
{
	struct rtattr *a = tail(r);

	put(r, type, NULL, 0);
	return a;
}

static void nest_end(struct nlreq *r, struct rtattr *a)
{
	if (r->h.nlmsg_len)
		a->rta_len = (unsigned short)((char *)tail(r) - (char *)a);
}

static void init(struct nlreq *r, int type, int flags, const void *hdr, size_t len)
{
	memset(r, 0, sizeof(*r));
	r->h.nlmsg_len = (uint32_t)NLMSG_LENGTH(len);
	r->h.nlmsg_type = (unsigned short)type;
	r->h.nlmsg_flags = (unsigned short)(NLM_F_REQUEST | flags);
	r->h.nlmsg_seq = next_seq();
	memcpy(r->raw + NLMSG_HDRLEN, hdr, len);
}

/* Send, then read until the kernel's ACK (or a dump's DONE); the messages before it go to
 * `each` (a GET's answer). */
static int talk(int nlsk, struct nlreq *r, int (*each)(struct nlmsghdr *, void *), void *arg)
{
	char rx[32768] __attribute__((aligned(4)));
	struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};

	if (!r->h.nlmsg_len)
		return -EMSGSIZE;
	if (sendto(nlsk, r->raw, r->h.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
		return -errno;
	for (;;) {
		ssize_t n = recv(nlsk, rx, sizeof(rx), 0);
		struct nlmsghdr *h;

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		for (h = (struct nlmsghdr *)rx; NLMSG_OK(h, (unsigned)n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_seq != r->h.nlmsg_seq)
				continue; /* an answer to an earlier request that gave up */
			if (h->nlmsg_type == NLMSG_ERROR)
				return ((struct nlmsgerr *)NLMSG_DATA(h))->error; /* 0: the ACK */
			if (h->nlmsg_type == NLMSG_DONE)
				return 0;
			if (each) {
				int ret = each(h, arg);

				if (ret < 0)
					return ret;
			}
		}
	}
}

/* --- namespaces ---------------------------------------------------------------------------- */

struct ns_job {
	int nsfd, domain, type, proto, make;
	int fd, err;
};

/* unshare(CLONE_NEWNET) and setns() move only the calling thread: a short-lived one does it,
 * so the caller's threads never leave their namespace */
static void *ns_thread(void *arg)
{
	struct ns_job *j = arg;

	if (j->make) {
		if (unshare(CLONE_NEWNET) < 0)
			j->err = errno;
		else if ((j->fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)) < 0)
			j->err = errno;
		return NULL;
	}
	if (j->nsfd >= 0 && setns(j->nsfd, CLONE_NEWNET) < 0) {
		j->err = errno;
		return NULL;
	}
	j->fd = socket(j->domain, j->type | SOCK_CLOEXEC, j->proto);
	if (j->fd < 0)
		j->err = errno;
	return NULL;
}

static int run_ns_job(struct ns_job *j, int *fd_out)
{
	pthread_t t;
	int ret;

	j->fd = -1;
	ret = pthread_create(&t, NULL, ns_thread, j);
	if (ret)
		return -ret;
	pthread_join(t, NULL);
	if (j->err)
		return -j->err;
	*fd_out = j->fd;
	return 0;
}

int pycpt_nic_netns_new(int *nsfd_out)
{
	struct ns_job j = {.make = 1};

	return run_ns_job(&j, nsfd_out);
}

int pycpt_nic_socket_in(int nsfd, int domain, int type, int proto, int *fd_out)
{
	struct ns_job j = {.nsfd = nsfd, .domain = domain, .type = type, .proto = proto};

	return run_ns_job(&j, fd_out);
}

/* --- links --------------------------------------------------------------------------------- */

struct link_out {
	int ifindex, up, master, stp;
	char *kind;
	uint8_t *mac;
};

/* a bridge's IFLA_BR_STP_STATE from its link info data (0 for anything else) */
static int bridge_stp(struct rtattr *data)
{
	int len = (int)RTA_PAYLOAD(data);
	struct rtattr *d;
	uint32_t stp = 0;

	for (d = RTA_DATA(data); RTA_OK(d, len); d = RTA_NEXT(d, len))
		if (d->rta_type == IFLA_BR_STP_STATE && RTA_PAYLOAD(d) >= sizeof(stp))
			memcpy(&stp, RTA_DATA(d), sizeof(stp));
	return stp != 0;
}

static int on_link(struct nlmsghdr *h, void *arg)
{
	struct link_out *o = arg;
	struct ifinfomsg *ifi = NLMSG_DATA(h);
	int len = (int)IFLA_PAYLOAD(h);
	struct rtattr *a;

	if (h->nlmsg_type != RTM_NEWLINK)
		return 0;
	o->ifindex = ifi->ifi_index;
	o->up = !!(ifi->ifi_flags & IFF_UP);
	for (a = IFLA_RTA(ifi); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
		if (a->rta_type == IFLA_ADDRESS && RTA_PAYLOAD(a) == PYCPT_NIC_MAC_LEN) {
			memcpy(o->mac, RTA_DATA(a), PYCPT_NIC_MAC_LEN);
		} else if (a->rta_type == IFLA_MASTER && RTA_PAYLOAD(a) >= sizeof(int)) {
			memcpy(&o->master, RTA_DATA(a), sizeof(int));
		} else if (a->rta_type == IFLA_LINKINFO) {
			int ilen = (int)RTA_PAYLOAD(a);
			struct rtattr *i;

			for (i = RTA_DATA(a); RTA_OK(i, ilen); i = RTA_NEXT(i, ilen)) {
				if (i->rta_type == IFLA_INFO_KIND)
					snprintf(o->kind, PYCPT_NIC_KIND_LEN, "%.*s",
						 (int)strnlen(RTA_DATA(i), RTA_PAYLOAD(i)),
						 (char *)RTA_DATA(i));
				else if (i->rta_type == IFLA_INFO_DATA)
					o->stp = bridge_stp(i);
			}
		}
	}
	return 0;
}

int pycpt_nic_link_get(int nlsk, const char *name, int *ifindex, char kind[PYCPT_NIC_KIND_LEN],
		       uint8_t mac[PYCPT_NIC_MAC_LEN], int *up, int *master, int *stp)
{
	struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC};
	struct link_out o = {.kind = kind, .mac = mac};
	struct nlreq r;
	int ret;

	if (!name[0] || strlen(name) >= IFNAMSIZ)
		return -EINVAL;
	kind[0] = 0;
	memset(mac, 0, PYCPT_NIC_MAC_LEN);
	init(&r, RTM_GETLINK, NLM_F_ACK, &ifi, sizeof(ifi));
	put(&r, IFLA_IFNAME, name, strlen(name) + 1);
	ret = talk(nlsk, &r, on_link, &o);
	if (ret < 0)
		return ret;
	if (!o.ifindex)
		return -ENODEV;
	*ifindex = o.ifindex;
	*up = o.up;
	*master = o.master;
	*stp = o.stp;
	return 0;
}

int pycpt_nic_veth_add(int nlsk, const char *outside, const char *inside, int inside_nsfd,
		       const uint8_t *mac_in, const uint8_t *mac_out, unsigned mtu,
		       int *outside_ifindex)
{
	struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC}, peer = {.ifi_family = AF_UNSPEC};
	struct rtattr *info, *data, *p;
	uint8_t mac[PYCPT_NIC_MAC_LEN];
	char kind[PYCPT_NIC_KIND_LEN];
	int ret, up, master, stp;
	struct nlreq r;

	if (!outside[0] || !inside[0] || strlen(outside) >= IFNAMSIZ || strlen(inside) >= IFNAMSIZ)
		return -EINVAL;
	init(&r, RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &ifi, sizeof(ifi));
	put(&r, IFLA_IFNAME, outside, strlen(outside) + 1);
	if (mac_out)
		put(&r, IFLA_ADDRESS, mac_out, PYCPT_NIC_MAC_LEN);
	if (mtu)
		put(&r, IFLA_MTU, &mtu, sizeof(mtu));
	info = nest(&r, IFLA_LINKINFO);
	put(&r, IFLA_INFO_KIND, "veth", 4);
	data = nest(&r, IFLA_INFO_DATA);
	/* the peer: an ifinfomsg, then its own attributes, all inside VETH_INFO_PEER */
	p = nest(&r, VETH_INFO_PEER);
	if (r.h.nlmsg_len && r.h.nlmsg_len + NLMSG_ALIGN(sizeof(peer)) <= sizeof(r.raw)) {
		memcpy(r.raw + r.h.nlmsg_len, &peer, sizeof(peer));
		r.h.nlmsg_len += (uint32_t)NLMSG_ALIGN(sizeof(peer));
	}
	put(&r, IFLA_IFNAME, inside, strlen(inside) + 1);
	if (mac_in)
		put(&r, IFLA_ADDRESS, mac_in, PYCPT_NIC_MAC_LEN);
	if (mtu)
		put(&r, IFLA_MTU, &mtu, sizeof(mtu));
	/* made straight in the container's namespace: the host never sees that end */
	put(&r, IFLA_NET_NS_FD, &inside_nsfd, sizeof(inside_nsfd));
	nest_end(&r, p);
	nest_end(&r, data);
	nest_end(&r, info);
	ret = talk(nlsk, &r, NULL, NULL);
	if (ret < 0 || !outside_ifindex)
		return ret;
	return pycpt_nic_link_get(nlsk, outside, outside_ifindex, kind, mac, &up, &master,
				  &stp);
}

int pycpt_nic_link_set(int nlsk, int ifindex, int master, int up, const uint8_t *mac,
		       unsigned mtu)
{
	struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC, .ifi_index = ifindex};
	struct nlreq r;

	if (ifindex <= 0)
		return -EINVAL;
	if (up >= 0) {
		ifi.ifi_change = IFF_UP;
		ifi.ifi_flags = up ? IFF_UP : 0;
	}
	init(&r, RTM_NEWLINK, NLM_F_ACK, &ifi, sizeof(ifi));
	if (mac)
		put(&r, IFLA_ADDRESS, mac, PYCPT_NIC_MAC_LEN);
	/* before IFLA_MASTER in the kernel's do_setlink: the port joins with its own MTU */
	if (mtu)
		put(&r, IFLA_MTU, &mtu, sizeof(mtu));
	if (master >= 0)
		put(&r, IFLA_MASTER, &master, sizeof(master));
	return talk(nlsk, &r, NULL, NULL);
}

int pycpt_nic_link_del(int nlsk, int ifindex)
{
	struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC, .ifi_index = ifindex};
	struct nlreq r;

	if (ifindex <= 0)
		return -EINVAL;
	init(&r, RTM_DELLINK, NLM_F_ACK, &ifi, sizeof(ifi));
	return talk(nlsk, &r, NULL, NULL);
}

int pycpt_nic_port_state(int nlsk, int ifindex, int state)
{
	struct ifinfomsg ifi = {.ifi_family = AF_BRIDGE, .ifi_index = ifindex};
	uint8_t st = (uint8_t)state;
	struct rtattr *pi;
	struct nlreq r;

	if (ifindex <= 0 || state < BR_STATE_DISABLED || state > BR_STATE_BLOCKING)
		return -EINVAL;
	init(&r, RTM_SETLINK, NLM_F_ACK, &ifi, sizeof(ifi));
	pi = nest(&r, IFLA_PROTINFO | NLA_F_NESTED);
	put(&r, IFLA_BRPORT_STATE, &st, sizeof(st));
	nest_end(&r, pi);
	return talk(nlsk, &r, NULL, NULL);
}

/* --- addresses and routes ------------------------------------------------------------------ */

static int addr_len(int family)
{
	return family == AF_INET ? 4 : family == AF_INET6 ? 16 : -1;
}

int pycpt_nic_addr_add(int nlsk, int ifindex, int family, const uint8_t *addr, int prefixlen)
{
	struct ifaddrmsg ifa = {.ifa_family = (uint8_t)family, .ifa_prefixlen = (uint8_t)prefixlen,
				.ifa_index = (unsigned)ifindex};
	int len = addr_len(family);
	unsigned flags = IFA_F_NODAD;
	struct nlreq r;

	if (len < 0 || prefixlen < 0 || prefixlen > len * 8 || ifindex <= 0)
		return -EINVAL;
	if (family == AF_INET6)
		ifa.ifa_flags = IFA_F_NODAD; /* probed already; CRIU keeps the flag across restores */
	init(&r, RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &ifa, sizeof(ifa));
	put(&r, IFA_LOCAL, addr, (size_t)len);
	put(&r, IFA_ADDRESS, addr, (size_t)len);
	if (family == AF_INET6)
		put(&r, IFA_FLAGS, &flags, sizeof(flags));
	return talk(nlsk, &r, NULL, NULL);
}

struct addr_out {
	int ifindex, cap, count;
	uint8_t *out;
};

static int on_addr(struct nlmsghdr *h, void *arg)
{
	struct addr_out *o = arg;
	struct ifaddrmsg *ifa = NLMSG_DATA(h);
	int len = (int)IFA_PAYLOAD(h), alen = addr_len(ifa->ifa_family);
	const void *local = NULL, *address = NULL;
	struct rtattr *a;
	uint8_t *e;

	if (h->nlmsg_type != RTM_NEWADDR || alen < 0 ||
	    (o->ifindex && (int)ifa->ifa_index != o->ifindex))
		return 0;
	for (a = IFA_RTA(ifa); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
		if ((int)RTA_PAYLOAD(a) != alen)
			continue;
		if (a->rta_type == IFA_LOCAL)
			local = RTA_DATA(a);
		else if (a->rta_type == IFA_ADDRESS)
			address = RTA_DATA(a);
	}
	if (!local) /* IFA_ADDRESS is the peer's on point-to-point links: IFA_LOCAL is ours */
		local = address;
	if (!local)
		return 0;
	if (o->count < o->cap) {
		e = o->out + (size_t)o->count * PYCPT_NIC_ADDR_ENTRY;
		memset(e, 0, PYCPT_NIC_ADDR_ENTRY);
		e[0] = ifa->ifa_family;
		e[1] = ifa->ifa_prefixlen;
		memcpy(e + 2, local, (size_t)alen);
	}
	o->count++;
	return 0;
}

int pycpt_nic_addr_list(int nlsk, int ifindex, uint8_t *out, int cap, int *count)
{
	struct ifaddrmsg ifa = {.ifa_family = AF_UNSPEC};
	struct addr_out o = {.ifindex = ifindex, .cap = cap, .out = out};
	struct nlreq r;
	int ret;

	if (cap < 0 || ifindex < 0)
		return -EINVAL;
	init(&r, RTM_GETADDR, NLM_F_DUMP, &ifa, sizeof(ifa));
	ret = talk(nlsk, &r, on_addr, &o);
	if (ret < 0)
		return ret;
	*count = o.count;
	return 0;
}

int pycpt_nic_route_add_default(int nlsk, int ifindex, int family, const uint8_t *gw)
{
	struct rtmsg rt = {.rtm_family = (uint8_t)family, .rtm_table = RT_TABLE_MAIN,
			   .rtm_protocol = RTPROT_BOOT, .rtm_type = RTN_UNICAST,
			   .rtm_scope = gw ? RT_SCOPE_UNIVERSE : RT_SCOPE_LINK};
	int len = addr_len(family);
	struct nlreq r;

	if (len < 0 || ifindex <= 0)
		return -EINVAL;
	init(&r, RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &rt, sizeof(rt));
	if (gw)
		put(&r, RTA_GATEWAY, gw, (size_t)len);
	put(&r, RTA_OIF, &ifindex, sizeof(ifindex));
	return talk(nlsk, &r, NULL, NULL);
}

/* --- frames ---------------------------------------------------------------------------------- */

struct arp_frame {
	uint8_t dst[6], src[6];
	uint16_t type;
	uint16_t htype, ptype;
	uint8_t hlen, plen;
	uint16_t op;
	uint8_t sha[6], spa[4], tha[6], tpa[4];
} __attribute__((packed));

struct nd_frame {
	uint8_t dst[6], src[6];
	uint16_t type;
	uint32_t vtc; /* version, traffic class, flow label */
	uint16_t plen;
	uint8_t nh, hops;
	uint8_t saddr[16], daddr[16];
	uint8_t icmp_type, icmp_code;
	uint16_t sum;
	uint32_t flags; /* NA: router, solicited, override; NS: reserved */
	uint8_t target[16];
	uint8_t opt_type, opt_len, opt_mac[6]; /* NA: the target link-layer address option */
} __attribute__((packed));

#define ND_SOLICIT 135
#define ND_ADVERT 136
#define ND_MIN_LEN (14 + 40 + 24)

static const uint8_t BROADCAST[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static int send_frame(int pktsk, int ifindex, const void *frame, size_t len, uint16_t proto)
{
	struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_protocol = htons(proto),
				 .sll_ifindex = ifindex, .sll_halen = 6};

	memcpy(to.sll_addr, frame, 6); /* the frame's destination MAC */
	if (sendto(pktsk, frame, len, 0, (struct sockaddr *)&to, sizeof(to)) < 0)
		return -errno;
	return 0;
}

static void arp_build(struct arp_frame *f, const uint8_t mac[6], const uint8_t spa[4],
		      const uint8_t tpa[4])
{
	memset(f, 0, sizeof(*f));
	memcpy(f->dst, BROADCAST, 6);
	memcpy(f->src, mac, 6);
	f->type = htons(ETH_P_ARP);
	f->htype = htons(ARPHRD_ETHER);
	f->ptype = htons(ETH_P_IP);
	f->hlen = 6;
	f->plen = 4;
	f->op = htons(ARPOP_REQUEST);
	memcpy(f->sha, mac, 6);
	memcpy(f->spa, spa, 4);
	memcpy(f->tpa, tpa, 4);
}

static uint16_t icmp6_sum(const struct nd_frame *f, size_t icmp_len)
{
	const uint8_t *p = f->saddr;
	uint32_t sum = 0;
	size_t i;

	for (i = 0; i < 32; i += 2) /* pseudo-header: source and destination */
		sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	sum += (uint32_t)icmp_len + IPPROTO_ICMPV6;
	for (p = &f->icmp_type, i = 0; i + 1 < icmp_len; i += 2)
		sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return htons((uint16_t)~sum);
}

/* an NS or an NA; an NS from :: carries no source link-layer option (RFC 4861 4.3) */
static size_t nd_build(struct nd_frame *f, int type, const uint8_t mac[6], const uint8_t src[16],
		       const uint8_t dst[16], const uint8_t target[16])
{
	size_t icmp_len = 24 + (type == ND_ADVERT ? 8 : 0);

	memset(f, 0, sizeof(*f));
	f->dst[0] = 0x33; /* IPv6 multicast MAC: 33:33 + the group's low 32 bits */
	f->dst[1] = 0x33;
	memcpy(f->dst + 2, dst + 12, 4);
	memcpy(f->src, mac, 6);
	f->type = htons(ETH_P_IPV6);
	f->vtc = htonl(6u << 28);
	f->plen = htons((uint16_t)icmp_len);
	f->nh = IPPROTO_ICMPV6;
	f->hops = 255; /* anything else is dropped by the receiver (RFC 4861 7.1) */
	memcpy(f->saddr, src, 16);
	memcpy(f->daddr, dst, 16);
	f->icmp_type = (uint8_t)type;
	memcpy(f->target, target, 16);
	if (type == ND_ADVERT) {
		f->flags = htonl(0x20000000); /* override; neither solicited nor router */
		f->opt_type = 2;
		f->opt_len = 1;
		memcpy(f->opt_mac, mac, 6);
	}
	f->sum = icmp6_sum(f, icmp_len);
	return 14 + 40 + icmp_len;
}

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

typedef int (*claims_fn)(const uint8_t *rx, size_t n, const uint8_t *ip, uint8_t who[6]);

/* Send `probes` frames 20 ms apart, reading answers until timeout_ms has passed; `claims`
 * says whether a received frame claims ip (and from which MAC). */
static int probe(int pktsk, int ifindex, const void *frame, size_t len, uint16_t proto,
		 int probes, int timeout_ms, claims_fn claims, const uint8_t *ip,
		 const uint8_t *mac, const uint8_t *ignore_mac, int *found, uint8_t owner[6])
{
	struct sockaddr_ll at = {.sll_family = AF_PACKET, .sll_protocol = htons(proto),
				 .sll_ifindex = ifindex};
	long long start = now_ms(), next = start;
	uint8_t rx[2048], who[6];
	int sent = 0, ret;

	*found = 0;
	if (probes < 1 || timeout_ms < 0)
		return -EINVAL;
	/* bound to this protocol on this link only; frames of an earlier probe are drained */
	if (bind(pktsk, (struct sockaddr *)&at, sizeof(at)) < 0)
		return -errno;
	while (recv(pktsk, rx, sizeof(rx), MSG_DONTWAIT) >= 0)
		;
	for (;;) {
		struct pollfd pfd = {.fd = pktsk, .events = POLLIN};
		long long t = now_ms(), wait;
		ssize_t n;

		if (sent < probes && t >= next) {
			ret = send_frame(pktsk, ifindex, frame, len, proto);
			if (ret < 0)
				return ret;
			sent++;
			next = t + 20;
		}
		if (t - start >= timeout_ms && sent >= probes)
			return 0;
		wait = (sent < probes ? next : start + timeout_ms) - t;
		if (poll(&pfd, 1, (int)(wait > 0 ? wait : 0)) < 0 && errno != EINTR)
			return -errno;
		if (!(pfd.revents & POLLIN))
			continue;
		n = recv(pktsk, rx, sizeof(rx), MSG_DONTWAIT);
		if (n < 0)
			continue;
		if (claims(rx, (size_t)n, ip, who) && memcmp(who, mac, 6) &&
		    !(ignore_mac && !memcmp(who, ignore_mac, 6))) {
			*found = 1;
			memcpy(owner, who, 6);
			return 0;
		}
	}
}

/* an ARP frame whose sender is ip: an answer to our probe, or the owner's own traffic */
static int arp_claims(const uint8_t *rx, size_t n, const uint8_t *ip, uint8_t who[6])
{
	const struct arp_frame *f = (const void *)rx;

	if (n < sizeof(*f) || f->type != htons(ETH_P_ARP) || f->ptype != htons(ETH_P_IP) ||
	    f->hlen != 6 || f->plen != 4)
		return 0;
	memcpy(who, f->sha, 6);
	return !memcmp(f->spa, ip, 4);
}

/* a neighbour advertisement for ip (the owner's answer to a DAD solicitation) */
static int na_claims(const uint8_t *rx, size_t n, const uint8_t *ip, uint8_t who[6])
{
	const struct nd_frame *f = (const void *)rx;

	if (n < ND_MIN_LEN || f->type != htons(ETH_P_IPV6) || f->nh != IPPROTO_ICMPV6 ||
	    f->icmp_type != ND_ADVERT || memcmp(f->target, ip, 16))
		return 0;
	memcpy(who, f->src, 6);
	return 1;
}

int pycpt_nic_probe4(int pktsk, int ifindex, const uint8_t mac[PYCPT_NIC_MAC_LEN],
		     const uint8_t ip[4], int probes, int timeout_ms, const uint8_t *ignore_mac,
		     int *found, uint8_t owner[PYCPT_NIC_MAC_LEN])
{
	static const uint8_t unspecified[4];
	struct arp_frame f;

	arp_build(&f, mac, unspecified, ip);
	return probe(pktsk, ifindex, &f, sizeof(f), ETH_P_ARP, probes, timeout_ms, arp_claims, ip,
		     mac, ignore_mac, found, owner);
}

int pycpt_nic_probe6(int pktsk, int ifindex, const uint8_t mac[PYCPT_NIC_MAC_LEN],
		     const uint8_t ip[16], int probes, int timeout_ms, const uint8_t *ignore_mac,
		     int *found, uint8_t owner[PYCPT_NIC_MAC_LEN])
{
	static const uint8_t unspecified[16];
	uint8_t group[16] = {0xff, 0x02, [11] = 0x01, [12] = 0xff};
	struct nd_frame f;
	size_t len;

	memcpy(group + 13, ip + 13, 3); /* ip's solicited-node multicast group */
	len = nd_build(&f, ND_SOLICIT, mac, unspecified, group, ip);
	return probe(pktsk, ifindex, &f, len, ETH_P_IPV6, probes, timeout_ms, na_claims, ip, mac,
		     ignore_mac, found, owner);
}

int pycpt_nic_announce4(int pktsk, int ifindex, const uint8_t mac[PYCPT_NIC_MAC_LEN],
			const uint8_t ip[4])
{
	struct arp_frame f;

	arp_build(&f, mac, ip, ip);
	return send_frame(pktsk, ifindex, &f, sizeof(f), ETH_P_ARP);
}

int pycpt_nic_announce6(int pktsk, int ifindex, const uint8_t mac[PYCPT_NIC_MAC_LEN],
			const uint8_t ip[16])
{
	static const uint8_t all_nodes[16] = {0xff, 0x02, [15] = 0x01};
	struct nd_frame f;
	size_t len = nd_build(&f, ND_ADVERT, mac, ip, all_nodes, ip);

	return send_frame(pktsk, ifindex, &f, len, ETH_P_IPV6);
}

/* --- the kick -------------------------------------------------------------------------------- */

static uint16_t csum(const uint8_t *p, size_t len)
{
	uint32_t sum = 0;
	size_t i;

	for (i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (len & 1)
		sum += (uint32_t)(p[len - 1] << 8);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return htons((uint16_t)~sum);
}

/* the quoted segment's first 8 TCP bytes, as the peer sent it (peer -> local) */
static void quote_tcp(uint8_t *tcp, uint16_t peer_port, uint16_t local_port, uint32_t peer_seq)
{
	uint16_t sp = htons(peer_port), dp = htons(local_port);
	uint32_t seq = htonl(peer_seq);

	memcpy(tcp, &sp, 2);
	memcpy(tcp + 2, &dp, 2);
	memcpy(tcp + 4, &seq, 4);
}

int pycpt_nic_kick4(int rawsk, const uint8_t peer[4], uint16_t peer_port, const uint8_t local[4],
		    uint16_t local_port, uint32_t peer_seq)
{
	uint8_t m[8 + 20 + 8] = {3, 1}; /* destination unreachable: host unreachable */
	uint8_t *ip = m + 8;
	struct sockaddr_in to = {.sin_family = AF_INET};
	uint16_t total = htons(40), sum;

	ip[0] = 0x45;
	memcpy(ip + 2, &total, 2);
	ip[8] = 64;
	ip[9] = IPPROTO_TCP;
	memcpy(ip + 12, peer, 4);
	memcpy(ip + 16, local, 4);
	sum = csum(ip, 20);
	memcpy(ip + 10, &sum, 2);
	quote_tcp(m + 28, peer_port, local_port, peer_seq);
	sum = csum(m, sizeof(m));
	memcpy(m + 2, &sum, 2);
	memcpy(&to.sin_addr, peer, 4);
	if (sendto(rawsk, m, sizeof(m), 0, (struct sockaddr *)&to, sizeof(to)) < 0)
		return -errno;
	return 0;
}

int pycpt_nic_kick6(int rawsk, const uint8_t peer[16], uint16_t peer_port,
		    const uint8_t local[16], uint16_t local_port, uint32_t peer_seq)
{
	uint8_t m[8 + 40 + 8] = {1, 0}; /* destination unreachable: no route (the kernel sums) */
	uint8_t *ip = m + 8;
	struct sockaddr_in6 to = {.sin6_family = AF_INET6};
	uint16_t payload = htons(20);

	ip[0] = 0x60;
	memcpy(ip + 4, &payload, 2);
	ip[6] = IPPROTO_TCP;
	ip[7] = 64;
	memcpy(ip + 8, peer, 16);
	memcpy(ip + 24, local, 16);
	quote_tcp(m + 48, peer_port, local_port, peer_seq);
	memcpy(&to.sin6_addr, peer, 16);
	if (sendto(rawsk, m, sizeof(m), 0, (struct sockaddr *)&to, sizeof(to)) < 0)
		return -errno;
	return 0;
}
