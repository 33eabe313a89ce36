/* A container's NIC, made and managed from the host side: a veth pair whose inside end lives
 * in the container's network namespace and whose outside end is a port of a host bridge.
 *
 * Netlink and packet sockets are opened by the caller (in the right namespace, with
 * pycpt_nic_socket_in) and passed in; every shim returns 0 (or >= 0) or -errno. */
#ifndef PYCPT_NIC_H
#define PYCPT_NIC_H

#include <stdint.h>

#define PYCPT_NIC_MAC_LEN 6
#define PYCPT_NIC_KIND_LEN 16
/* pycpt_nic_addr_list() entries: family (AF_INET/AF_INET6), prefix length, 16 address bytes */
#define PYCPT_NIC_ADDR_ENTRY 18

/* bridge port states (IFLA_BRPORT_STATE): DISABLED holds every frame both ways */
#define PYCPT_NIC_PORT_DISABLED 0
#define PYCPT_NIC_PORT_FORWARDING 3

/* a new network namespace, held by the returned descriptor only (closing it lets the
 * namespace and every link in it go) */
int pycpt_nic_netns_new(int *nsfd_out);

/* socket(domain, type | SOCK_CLOEXEC, proto) made in the network namespace nsfd (-1: the
 * caller's); netlink and packet sockets stay bound to the namespace they were made in */
int pycpt_nic_socket_in(int nsfd, int domain, int type, int proto, int *fd_out);

/* a link by name: ifindex, kind ("bridge", "veth", ... or "" for none), MAC, admin-up, its
 * master's ifindex (0: none) and, for a bridge, whether it runs the kernel's STP */
int pycpt_nic_link_get(int nlsk, const char *name, int *ifindex, char kind[PYCPT_NIC_KIND_LEN],
		       uint8_t mac[PYCPT_NIC_MAC_LEN], int *up, int *master, int *stp);

/* a veth pair: `outside` in nlsk's namespace, its peer `inside` made straight in namespace
 * inside_nsfd, with the given MACs (NULL: the kernel's random one) and mtu (0: default) */
int pycpt_nic_veth_add(int nlsk, const char *outside, const char *inside, int inside_nsfd,
		       const uint8_t *mac_in, const uint8_t *mac_out, unsigned mtu,
		       int *outside_ifindex);

/* master >= 0 sets the bridge (0: none), up >= 0 sets IFF_UP, mac (non-NULL) the address,
 * mtu (non-zero) the MTU; -1 / NULL / 0 leave it alone */
int pycpt_nic_link_set(int nlsk, int ifindex, int master, int up, const uint8_t *mac,
		       unsigned mtu);

/* delete a link (a veth end takes its peer with it) */
int pycpt_nic_link_del(int nlsk, int ifindex);

/* the port's state on its bridge; -EBUSY when the bridge runs kernel STP (which owns it) */
int pycpt_nic_port_state(int nlsk, int ifindex, int state);

/* an address (4 or 16 bytes by family); IPv6 ones get IFA_F_NODAD (pycpt probes first) */
int pycpt_nic_addr_add(int nlsk, int ifindex, int family, const uint8_t *addr, int prefixlen);

/* the addresses of ifindex (0: of every link), PYCPT_NIC_ADDR_ENTRY bytes each, at most cap
 * of them; *count is how many there are (may exceed cap) */
int pycpt_nic_addr_list(int nlsk, int ifindex, uint8_t *out, int cap, int *count);

/* the default route of `family` via gw (NULL: on-link) out of ifindex */
int pycpt_nic_route_add_default(int nlsk, int ifindex, int family, const uint8_t *gw);

/* Is `ip` in use on the segment behind ifindex? Duplicate-address probes sent from a packet
 * socket with source MAC `mac`: ARP probes (RFC 5227, sender 0.0.0.0) or IPv6 DAD
 * solicitations (from ::), `probes` of them 20 ms apart, answers read for timeout_ms.
 * *found = 1 and owner = its MAC if anybody claims ip; `ignore_mac` (the migrating
 * container's own) does not count. */
int pycpt_nic_probe4(int pktsk, int ifindex, const uint8_t mac[PYCPT_NIC_MAC_LEN],
		     const uint8_t ip[4], int probes, int timeout_ms, const uint8_t *ignore_mac,
		     int *found, uint8_t owner[PYCPT_NIC_MAC_LEN]);
int pycpt_nic_probe6(int pktsk, int ifindex, const uint8_t mac[PYCPT_NIC_MAC_LEN],
		     const uint8_t ip[16], int probes, int timeout_ms, const uint8_t *ignore_mac,
		     int *found, uint8_t owner[PYCPT_NIC_MAC_LEN]);

/* after a move: gratuitous ARP (request form) and unsolicited neighbour advertisement
 * (Override) for ip, so that switches and peers learn the new port at once */
int pycpt_nic_announce4(int pktsk, int ifindex, const uint8_t mac[PYCPT_NIC_MAC_LEN],
			const uint8_t ip[4]);
int pycpt_nic_announce6(int pktsk, int ifindex, const uint8_t mac[PYCPT_NIC_MAC_LEN],
			const uint8_t ip[16]);

/* Ask a peer whose TCP is backing off to retransmit now (RFC 6069, in Linux since 2.6.38):
 * an ICMP host unreachable (v4) / no route (v6) quoting the peer's own segment at its
 * snd_una (= our rcv_nxt), sent from a raw ICMP socket of the container's namespace. Each
 * one undoes one doubling of the peer's retransmission timeout. */
int pycpt_nic_kick4(int rawsk, const uint8_t peer[4], uint16_t peer_port, const uint8_t local[4],
		    uint16_t local_port, uint32_t peer_seq);
int pycpt_nic_kick6(int rawsk, const uint8_t peer[16], uint16_t peer_port,
		    const uint8_t local[16], uint16_t local_port, uint32_t peer_seq);

#endif
