/* How fast can scattered 4 KiB blocks be read from the page cache at best?
 *
 * docs/design.md ("Fragmentation") cites this: it bounds what any read path (pread, io_uring, mmap)
 * can do for a fragmented head. It creates a 1 GiB file in the current directory, reads it with
 * sequential 1 MiB preads, with 4 KiB preads in random block order, and with memcpy from a
 * mapping in the same random order, three times each, then deletes the file.
 *
 *   gcc -O2 scripts/scatter-read-bound.c -o /tmp/scatter && /tmp/scatter
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    const size_t size = 1UL << 30, mib = 1UL << 20, blk = 4096, nb = size / blk;
    const char *path = "scatter-read-bound.tmp";
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, size) != 0) {
        perror(path);
        return 1;
    }
    char *buf = aligned_alloc(blk, mib);
    memset(buf, 1, mib);
    for (size_t o = 0; o < size; o += mib)
        if (pwrite(fd, buf, mib, o) != (ssize_t)mib) {
            perror("pwrite");
            return 1;
        }
    unsigned *perm = malloc(nb * sizeof *perm);
    for (size_t i = 0; i < nb; i++) perm[i] = i;
    srand(1);
    for (size_t i = nb - 1; i > 0; i--) {
        size_t j = (size_t)rand() % (i + 1);
        unsigned t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    char *map = mmap(0, size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
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
