/* A container's network hold: one nf_tables table, "inet pycpt-hold", in its network
 * namespace. Two base chains (input, output; policy drop) let through only packets that
 * carry CRIU's repair mark. Made dormant when the container starts (hooks unregistered: no
 * cost while it runs), woken while it is suspended or dumped, put back to sleep when it runs
 * again. Links, addresses and routes are never touched, so CRIU records them as they are. */
#ifndef PYCPT_NETHOLD_H
#define PYCPT_NETHOLD_H

#define PYCPT_NETHOLD_TABLE "pycpt-hold"

/* what to do (op) */
#define PYCPT_NETHOLD_MAKE 1   /* create the table dormant; it must not exist yet */
#define PYCPT_NETHOLD_ON 2     /* wake it; created active when missing (returns 1 then) */
#define PYCPT_NETHOLD_OFF 3    /* put it to sleep; a missing table is fine (returns 1) */
#define PYCPT_NETHOLD_DELETE 4 /* remove it; a missing table is fine (returns 1) */
#define PYCPT_NETHOLD_QUERY 5  /* 0: dormant, 1: holding; -ENOENT: no table */

/* In the calling thread's network namespace (init calls it before exec). */
int pycpt_nethold_here(int op);

/* In the network namespace of `pid`, on a thread of its own (setns moves only that thread),
 * so that the caller can freeze the cgroup meanwhile. Join exactly once: it frees the job. */
typedef struct pycpt_nethold pycpt_nethold_t;
int pycpt_nethold_start(int pid, int op, pycpt_nethold_t **out);
int pycpt_nethold_join(pycpt_nethold_t *job);

/* start + join */
int pycpt_nethold(int pid, int op);

/* Whether the hold can work here: MAKE, then ON, in a network namespace of its own made
 * for the probe (on a thread; the namespace goes with it). 0, or -errno of the step that
 * failed (-EPROTONOSUPPORT / -ENOENT: no nf_tables in this kernel). */
int pycpt_nethold_probe(void);

#endif
