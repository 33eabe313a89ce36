/* Starting a container's init in new namespaces, inside its cgroup. */
#ifndef PYCPT_CONTAINER_H
#define PYCPT_CONTAINER_H

#include <stddef.h>

#define PYCPT_CT_SHARE_NET 1 /* keep the host's network namespace */

/* the step init failed at (step_out), for the error message */
#define PYCPT_CT_STEP_SETUP 1
#define PYCPT_CT_STEP_CGROUP 2
#define PYCPT_CT_STEP_MOUNTS 3
#define PYCPT_CT_STEP_PROC 4
#define PYCPT_CT_STEP_LO 5
#define PYCPT_CT_STEP_HOSTNAME 6
#define PYCPT_CT_STEP_ROOT 7
#define PYCPT_CT_STEP_LOG 8
#define PYCPT_CT_STEP_EXEC 9
#define PYCPT_CT_STEP_NET 10 /* joining the network namespace the caller prepared */

/* netns_fd >= 0: join that network namespace (made and wired by the caller) instead of
 * making a new one; the caller may close it once this returns */
int pycpt_container_spawn(char *const argv[], char *const envp[], const char *cgroup_procs,
			  const char *log_path, const char *hostname, const char *root,
			  int flags, int status_fd, int netns_fd, int *pid_out, int *step_out);
int pycpt_container_links(int pid, int up, char *buf, size_t cap, int *len);

/* the same on a thread of its own, so that the caller can freeze meanwhile; join
 * it exactly once (it frees the job) */
typedef struct pycpt_links pycpt_links_t;
int pycpt_container_links_start(int pid, int up, char *buf, size_t cap, pycpt_links_t **out);
int pycpt_container_links_join(pycpt_links_t *links, int *len);

#endif
