/* A computation whose state lives in CPU registers (integer and SSE), for the register
 * category of tests/test_fidelity.py.
 *
 *   fidelity_regs run PUBLISH_FILE      loop forever; every BLOCK steps publish the state
 *   fidelity_regs replay STEP X D STEPS print the state STEPS steps after (STEP, X, D)
 *
 * Between publications the state exists only in registers, so a checkpoint that lost or
 * garbled them would make every later publication disagree with the replay. Publications go
 * to a MAP_SHARED file under a sequence counter (odd while writing). D is printed as the hex
 * of its bits: the floating-point result must match to the last bit.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define BLOCK (1u << 16)

struct published {
	volatile uint64_t seq;
	volatile uint64_t step;
	volatile uint64_t x;
	volatile uint64_t dbits;
};

static inline void advance(uint64_t *x, double *d)
{
	/* xorshift64* for the integer registers, a multiply-add for the SSE ones */
	uint64_t v = *x;
	v ^= v >> 12;
	v ^= v << 25;
	v ^= v >> 27;
	*x = v * 0x2545F4914F6CDD1DULL;
	*d = *d * 1.0000000001 + (double)(v & 0xffff) * 1e-9;
	if (*d > 1e6)
		*d -= 1e6;
}

static uint64_t bits(double d)
{
	uint64_t u;
	memcpy(&u, &d, sizeof u);
	return u;
}

static double from_bits(uint64_t u)
{
	double d;
	memcpy(&d, &u, sizeof d);
	return d;
}

int main(int argc, char **argv)
{
	if (argc == 6 && strcmp(argv[1], "replay") == 0) {
		uint64_t step = strtoull(argv[2], NULL, 10);
		uint64_t x = strtoull(argv[3], NULL, 16);
		double d = from_bits(strtoull(argv[4], NULL, 16));
		uint64_t n = strtoull(argv[5], NULL, 10);
		for (uint64_t i = 0; i < n; i++)
			advance(&x, &d);
		printf("%" PRIu64 " %016" PRIx64 " %016" PRIx64 "\n", step + n, x, bits(d));
		return 0;
	}
	if (argc != 3 || strcmp(argv[1], "run") != 0) {
		fprintf(stderr, "usage: %s run FILE | replay STEP X D STEPS\n", argv[0]);
		return 2;
	}
	int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || ftruncate(fd, 4096) < 0)
		return perror("open"), 1;
	struct published *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return perror("mmap"), 1;
	close(fd);
	uint64_t x = 0x9E3779B97F4A7C15ULL, step = 0;
	double d = 1.0;
	for (;;) {
		for (unsigned i = 0; i < BLOCK; i++)
			advance(&x, &d);
		step += BLOCK;
		p->seq++;
		__sync_synchronize();
		p->step = step;
		p->x = x;
		p->dbits = bits(d);
		__sync_synchronize();
		p->seq++;
	}
}
