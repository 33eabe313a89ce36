/* A workload for the migration fault tests (tests/test_migrate_faults.py): MIB MiB of
 * memory filled with a known pattern, and a loop that checks one page of it per step and
 * counts steps, forever. Watched from outside through /proc/PID/mem at the addresses it
 * writes once to INFOFILE ("<&st hex> <mem hex> <mib>"), which stay the same in a copy CRIU
 * restores:
 *     struct st { u64 step; u64 bad; u64 first_bad_page; u64 magic; }
 * A page that reads back as anything but the pattern (a post-copy page that came as zeros)
 * counts in `bad`; memory is never written otherwise, so its SHA-256 stays what it was.
 *     step_counter MIB INFOFILE */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

struct st {
	volatile uint64_t step, bad, first_bad_page, magic;
};
static struct st st = {0, 0, ~0ULL, 0x7063707473746570ULL};

static inline uint64_t pattern(uint64_t i)
{
	uint64_t z = i + 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	size_t size = (size_t)atoi(argv[1]) << 20, words = size / 8, pages = size / 4096;
	uint64_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char tmp[4096];
	FILE *f;

	if (mem == MAP_FAILED || pages == 0)
		return 3;
	for (size_t i = 0; i < words; i++)
		mem[i] = pattern(i);
	snprintf(tmp, sizeof(tmp), "%s.tmp", argv[2]);
	f = fopen(tmp, "w");
	if (!f)
		return 4;
	fprintf(f, "%lx %lx %s\n", (unsigned long)&st, (unsigned long)mem, argv[1]);
	fclose(f);
	rename(tmp, argv[2]);
	for (;;) {
		size_t p = st.step % pages, base = p * 512;

		for (size_t w = 0; w < 512; w++) {
			if (mem[base + w] != pattern(base + w)) {
				if (st.bad++ == 0)
					st.first_bad_page = p;
				mem[base + w] = pattern(base + w); /* each bad word counts once */
			}
		}
		st.step++;
	}
}
