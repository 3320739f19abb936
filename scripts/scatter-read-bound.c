/* How fast can scattered 4 KiB blocks be read from the page cache at best?
 *
 * Two experiments, each on a scratch file in the current directory that is deleted afterwards.
 *
 * Default: docs/design.md ("Fragmentation") cites this: it bounds what any read path (pread,
 * io_uring, mmap) can do for a fragmented head. It creates a 1 GiB file, reads it with sequential
 * 1 MiB preads, with 4 KiB preads in random block order, and with memcpy from a mapping in the
 * same random order, three times each.
 *
 * `spread`: docs/design.md ("Read path") cites this for the random-read row of `cairn bench`: at
 * depth 1,000 the head's 4 GiB are scattered over a data file about three times as large. It
 * writes a 12 GiB file, picks 1 Mi random blocks of it, reads them and the first 4 GiB once
 * (untimed, so everything is cached), then times 2 M random 4 KiB preads from the contiguous
 * 4 GiB against 2 M from the spread blocks, three times. It needs about 12 GiB of disk and of
 * page cache.
 *
 * `prefetch`: docs/design.md ("Read path") cites this: the default experiment's mapped copies
 * again, plain and with a software prefetch of the first two cache lines of the block 1, 2, 4 or
 * 8 places ahead, as Cairn's fragmented reads do. The default experiment's
 * "bound" was the latency of each block's TLB and cache misses, which the prefetch overlaps.
 *
 * `folios`: docs/design.md ("Read path") cites this: how a file was written decides how fast its
 * cached blocks read back, because the kernel (ext4 since 6.16, XFS earlier) caches a file in
 * folios as large as each write covers, aligned, and looks large folios up faster. It writes three
 * 1 GiB files: 1 MiB pwrites at 1 MiB-aligned offsets, 1 MiB pwrites 12 KiB off that alignment (as
 * Cairn's data runs are, between its metadata pages), and 4 KiB pwrites; then times 2 M random
 * cached 4 KiB preads of each, three times.
 *
 * `placement`: docs/design.md ("Read path", "What that leaves against a contiguous volume") cites
 * this: what placing copies-on-write in logical order could buy a head whose every block was
 * rewritten. On a cached 4 GiB file read through a mapping (as Cairn reads cached data), it times
 * 1 MiB copies in order against the same 1 Mi blocks copied one at a time, in logical order, from
 * two layouts: a random permutation (Cairn's: a block goes where the next free one is when it is
 * rewritten) and 1,000 generations each holding its blocks sorted by logical address (what
 * allocating a commit's blocks in logical order would give); six rounds, with Cairn's prefetch.
 *
 *   gcc -O2 scripts/scatter-read-bound.c -o /tmp/scatter && /tmp/scatter && /tmp/scatter spread
 *   /tmp/scatter folios; /tmp/scatter prefetch; /tmp/scatter placement
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static const size_t mib = 1UL << 20, blk = 4096;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Creates `path` with `size` bytes, written with 1 MiB pwrites; returns its fd, or -1. `buf`
 * holds at least 1 MiB. */
static int fill_file(const char *path, size_t size, char *buf) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, size) != 0) {
        perror(path);
        return -1;
    }
    memset(buf, 1, mib);
    for (size_t o = 0; o < size; o += mib)
        if (pwrite(fd, buf, mib, o) != (ssize_t)mib) {
            perror("pwrite");
            close(fd);
            unlink(path);
            return -1;
        }
    return fd;
}

/* The block numbers 0..nb in a fixed random order. */
static unsigned *shuffled(size_t nb) {
    unsigned *perm = malloc(nb * sizeof *perm);
    for (size_t i = 0; i < nb; i++) perm[i] = i;
    srand(1);
    for (size_t i = nb - 1; i > 0; i--) {
        size_t j = (size_t)rand() % (i + 1);
        unsigned t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    return perm;
}

/* A read-only shared mapping of `size` bytes of `fd`, or NULL (and `path` deleted). */
static char *map_file(int fd, size_t size, const char *path) {
    char *map = mmap(0, size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        perror("mmap");
        unlink(path);
        return NULL;
    }
    return map;
}

static int scatter(char *buf) {
    const size_t size = 1UL << 30, nb = size / blk;
    const char *path = "scatter-read-bound.tmp";
    int fd = fill_file(path, size, buf);
    if (fd < 0) return 1;
    unsigned *perm = shuffled(nb);
    char *map = map_file(fd, size, path);
    if (!map) return 1;
    for (int rep = 0; rep < 3; rep++) {
        double t = now();
        for (size_t o = 0; o < size; o += mib)
            if (pread(fd, buf, mib, o) != (ssize_t)mib) return 1;
        double seq = now() - t;
        t = now();
        for (size_t i = 0; i < nb; i++)
            if (pread(fd, buf + (i % 256) * blk, blk, (off_t)perm[i] * blk) != (ssize_t)blk) return 1;
        double scattered = now() - t;
        t = now();
        for (size_t i = 0; i < nb; i++) memcpy(buf + (i % 256) * blk, map + (size_t)perm[i] * blk, blk);
        double mapped = now() - t;
        printf("sequential 1 MiB pread %.0f MiB/s | scattered 4 KiB pread %.0f MiB/s (%.2f us/block) | "
               "scattered memcpy from mmap %.0f MiB/s (%.2f us/block)\n",
               1024 / seq, 1024 / scattered, scattered / nb * 1e6, 1024 / mapped, mapped / nb * 1e6);
    }
    munmap(map, size);
    close(fd);
    unlink(path);
    return 0;
}

static int prefetch(char *buf) {
    const size_t size = 1UL << 30, nb = size / blk;
    const char *path = "prefetch-read-bound.tmp";
    int fd = fill_file(path, size, buf);
    if (fd < 0) return 1;
    unsigned *perm = shuffled(nb);
    char *map = map_file(fd, size, path);
    if (!map) return 1;
    const int dists[] = {0, 1, 2, 4, 8};
    for (int rep = 0; rep < 4; rep++) {
        double t = now();
        for (size_t o = 0; o < size; o += mib)
            if (pread(fd, buf, mib, o) != (ssize_t)mib) return 1;
        double seq = now() - t;
        printf("sequential 1 MiB pread %.0f MiB/s; scattered memcpy from mmap, prefetch distance:", 1024 / seq);
        for (int d = 0; d < 5; d++) {
            size_t dist = dists[d];
            t = now();
            for (size_t i = 0; i < nb; i++) {
                if (dist && i + dist < nb) {
                    const char *p = map + (size_t)perm[i + dist] * blk;
                    __builtin_prefetch(p);
                    __builtin_prefetch(p + 64);
                }
                memcpy(buf + (i % 256) * blk, map + (size_t)perm[i] * blk, blk);
            }
            double mapped = now() - t;
            printf(" %zu: %.0f MiB/s (%.2f)%s", dist, 1024 / mapped, seq / mapped, d == 4 ? "\n" : ";");
        }
    }
    munmap(map, size);
    close(fd);
    unlink(path);
    return 0;
}

static unsigned long state = 88172645463325252UL;
static unsigned long next(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

/* Copies the 4 KiB blocks at `phys[0..nb]` of `map` in that order, with Cairn's prefetch (first two
 * lines of the block 4 ahead); returns the seconds taken. */
static double copy_blocks(const char *map, const unsigned *phys, size_t nb, char *buf) {
    double t = now();
    for (size_t i = 0; i < nb; i++) {
        if (i + 4 < nb) {
            const char *p = map + (size_t)phys[i + 4] * blk;
            __builtin_prefetch(p);
            __builtin_prefetch(p + 64);
        }
        memcpy(buf + (i % 256) * blk, map + (size_t)phys[i] * blk, blk);
    }
    return now() - t;
}

static int placement(char *buf) {
    const size_t size = 4UL << 30, nb = size / blk, gens = 1000;
    const char *path = "placement-read-bound.tmp";
    int fd = fill_file(path, size, buf);
    if (fd < 0) return 1;
    char *map = map_file(fd, size, path);
    if (!map) return 1;
    madvise(map, size, MADV_RANDOM);
    volatile char sink = 0;
    for (size_t o = 0; o < size; o += blk) sink += map[o];
    unsigned *perm = shuffled(nb), *sorted = malloc(nb * sizeof *sorted), *gen = malloc(nb * sizeof *gen);
    size_t *start = calloc(gens + 1, sizeof *start);
    /* Each block's last rewrite falls in a random generation; a generation's blocks lie together,
     * in logical order, generations one after another. */
    for (size_t i = 0; i < nb; i++) {
        gen[i] = next() % gens;
        start[gen[i] + 1]++;
    }
    for (size_t g = 0; g < gens; g++) start[g + 1] += start[g];
    for (size_t i = 0; i < nb; i++) sorted[i] = start[gen[i]]++;
    for (int round = 0; round < 6; round++) {
        double t = now();
        for (size_t o = 0; o < size; o += mib) memcpy(buf, map + o, mib);
        double seq = now() - t;
        double random = copy_blocks(map, perm, nb, buf), in_order = copy_blocks(map, sorted, nb, buf);
        printf("1 MiB copies in order %.0f MiB/s; 4 KiB copies: random placement %.0f (%.2f), "
               "%zu generations in logical order %.0f (%.2f)\n",
               4096 / seq, 4096 / random, seq / random, gens, 4096 / in_order, seq / in_order);
    }
    munmap(map, size);
    close(fd);
    unlink(path);
    return 0;
}

static int spread(char *buf) {
    const size_t gib = 1UL << 30, size = 12 * gib, nb = size / blk, sub = 4 * gib / blk;
    const int n = 2000000;
    const char *path = "spread-read-bound.tmp";
    int fd = fill_file(path, size, buf);
    if (fd < 0) return 1;
    size_t *spread = malloc(sub * sizeof *spread);
    for (size_t i = 0; i < sub; i++) spread[i] = next() % nb;
    for (size_t i = 0; i < sub; i++)
        if (pread(fd, buf, blk, spread[i] * blk) != (ssize_t)blk ||
            pread(fd, buf, blk, i * blk) != (ssize_t)blk)
            perror("pread");
    for (int round = 0; round < 3; round++) {
        double t = now();
        for (int i = 0; i < n; i++)
            if (pread(fd, buf, blk, (next() % sub) * blk) != (ssize_t)blk) perror("pread");
        double contiguous = n / (now() - t);
        t = now();
        for (int i = 0; i < n; i++)
            if (pread(fd, buf, blk, spread[next() % sub] * blk) != (ssize_t)blk) perror("pread");
        double spread_iops = n / (now() - t);
        printf("4 KiB preads: contiguous 4 GiB %.0f/s, 1 Mi blocks spread over 12 GiB %.0f/s, "
               "ratio %.2f\n",
               contiguous, spread_iops, spread_iops / contiguous);
    }
    close(fd);
    unlink(path);
    return 0;
}

static int folios(char *buf) {
    const size_t size = 1UL << 30, nb = size / blk;
    const int n = 2000000;
    const struct { const char *name; size_t start, chunk; } ways[] = {
        {"1 MiB aligned", 0, mib}, {"1 MiB 12 KiB off", 3 * blk, mib}, {"4 KiB", 0, blk}};
    int fds[3];
    char path[64];
    memset(buf, 1, mib);
    for (int w = 0; w < 3; w++) {
        snprintf(path, sizeof path, "folio-read-bound-%d.tmp", w);
        fds[w] = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
        unlink(path);
        if (fds[w] < 0) {
            perror(path);
            return 1;
        }
        for (size_t o = ways[w].start; o < ways[w].start + size; o += ways[w].chunk)
            if (pwrite(fds[w], buf, ways[w].chunk, o) != (ssize_t)ways[w].chunk) {
                perror("pwrite");
                return 1;
            }
    }
    for (int round = 0; round < 3; round++) {
        double aligned = 0;
        for (int w = 0; w < 3; w++) {
            double t = now();
            for (int i = 0; i < n; i++)
                if (pread(fds[w], buf, blk, ways[w].start + (next() % nb) * blk) != (ssize_t)blk)
                    perror("pread");
            double us = (now() - t) / n * 1e6;
            if (w == 0) aligned = us;
            printf("%s: %.2f us per cached 4 KiB pread (%.2f of aligned's rate)%s", ways[w].name,
                   us, aligned / us, w == 2 ? "\n" : "; ");
        }
    }
    for (int w = 0; w < 3; w++) close(fds[w]);
    return 0;
}

int main(int argc, char **argv) {
    char *buf = aligned_alloc(blk, mib);
    if (argc > 1 && strcmp(argv[1], "spread") == 0) return spread(buf);
    if (argc > 1 && strcmp(argv[1], "folios") == 0) return folios(buf);
    if (argc > 1 && strcmp(argv[1], "prefetch") == 0) return prefetch(buf);
    if (argc > 1 && strcmp(argv[1], "placement") == 0) return placement(buf);
    return scatter(buf);
}
