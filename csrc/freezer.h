/* cgroup freezer shims (v1 freezer.state, v2 cgroup.freeze/cgroup.events/cgroup.kill).
 *
 * pycpt_freezer_open() keeps the cgroup's files open in a handle (freeing it is
 * pycpt_freezer_close()); the other calls act on that handle. All return 0 or -errno and pass
 * results through out-parameters. timeout_ms < 0 waits without limit.
 */
#ifndef PYCPT_FREEZER_H
#define PYCPT_FREEZER_H

#include <stdint.h>

#define PYCPT_FREEZER_THAWED 0
#define PYCPT_FREEZER_FREEZING 1
#define PYCPT_FREEZER_FROZEN 2

/* Longest sleep between two re-reads of the state (v1 has no notification; v2 rate-limits it). */
#define PYCPT_FREEZER_MAX_BACKOFF_NS 1000000

typedef struct pycpt_freezer pycpt_freezer_t;

int pycpt_freezer_open(const char *cgroup, int version, pycpt_freezer_t **out);
void pycpt_freezer_close(pycpt_freezer_t *f);
int pycpt_freezer_freeze(pycpt_freezer_t *f, int timeout_ms, int64_t *elapsed_ns);
int pycpt_freezer_thaw(pycpt_freezer_t *f, int timeout_ms, int64_t *elapsed_ns);
int pycpt_freezer_state(pycpt_freezer_t *f, int *state);
int pycpt_freezer_requested(pycpt_freezer_t *f, int *frozen);
int pycpt_freezer_kill(pycpt_freezer_t *f, int timeout_ms, int64_t *elapsed_ns);

#endif
