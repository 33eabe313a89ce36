/* CRIU RPC transport: a `criu swrk` child on a SOCK_SEQPACKET socketpair. */
#ifndef PYCPT_RPC_H
#define PYCPT_RPC_H

#include <stddef.h>

/* flags of pycpt_rpc_spawn */
#define PYCPT_RPC_DIE_WITH_CALLER 1

int pycpt_rpc_spawn(char *const argv[], int stderr_fd, int keep_fd, int flags, int *sock_out,
		    int *pid_out);
int pycpt_rpc_send(int sock, const void *buf, size_t len);
int pycpt_rpc_next_size(int sock, int timeout_ms);
int pycpt_rpc_recv(int sock, void *buf, size_t cap, int *fd_out);
int pycpt_rpc_wait(int pid, int timeout_ms, int *status_out);

#endif
