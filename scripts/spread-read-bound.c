/* How much does the kernel alone lose when a head's blocks are spread over a bigger data file?
 *
 * docs/design.md ("Read path") cites this for the random-read row of `cairn bench`: at depth 1,000
 * the head's 4 GiB are scattered over a data file about three times as large. This program writes
 * a 12 GiB file in the current directory, picks 1 Mi random blocks of it, reads them all once
 * (untimed, so everything is cached), then times 2 M random 4 KiB preads from a contiguous 4 GiB
 * range against 2 M from the spread blocks, three times, and deletes the file. It needs about
 * 12 GiB of disk and of page cache.
 *
 *   gcc -O2 scripts/spread-read-bound.c -o /tmp/spread && /tmp/spread
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static unsigned long state = 88172645463325252UL;
static unsigned long next(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

int main(void) {
    const size_t gib = 1UL << 30, mib = 1UL << 20, blk = 4096;
    const size_t size = 12 * gib, nb = size / blk, sub = 4 * gib / blk;
    const int n = 2000000;
    const char *path = "spread-read-bound.tmp";
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        perror(path);
        return 1;
    }
    char *buf = aligned_alloc(blk, mib);
    memset(buf, 1, mib);
    for (size_t o = 0; o < size; o += mib)
        if (pwrite(fd, buf, mib, o) != (ssize_t)mib) {
            perror("pwrite");
            unlink(path);
            return 1;
        }
    size_t *spread = malloc(sub * sizeof *spread);
    for (size_t i = 0; i < sub; i++)
        spread[i] = next() % nb;
    for (size_t i = 0; i < sub; i++) {
        if (pread(fd, buf, blk, spread[i] * blk) != (ssize_t)blk)
            perror("pread");
        if (pread(fd, buf, blk, i * blk) != (ssize_t)blk)
            perror("pread");
    }
    for (int round = 0; round < 3; round++) {
        double t = now();
        for (int i = 0; i < n; i++)
            if (pread(fd, buf, blk, (next() % sub) * blk) != (ssize_t)blk)
                perror("pread");
        double contiguous = n / (now() - t);
        t = now();
        for (int i = 0; i < n; i++)
            if (pread(fd, buf, blk, spread[next() % sub] * blk) != (ssize_t)blk)
                perror("pread");
        double spread_iops = n / (now() - t);
        printf("4 KiB preads: contiguous 4 GiB %.0f/s, 1 Mi blocks spread over 12 GiB %.0f/s, "
               "ratio %.2f\n",
               contiguous, spread_iops, spread_iops / contiguous);
    }
    close(fd);
    unlink(path);
    return 0;
}
