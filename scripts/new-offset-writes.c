/* What does a write to a file offset the page cache holds no page for cost, buffered and direct?
 *
 * docs/design.md ("Write path") and crates/cairn-engine/src/device/direct.rs cite this: a
 * copy-on-write always writes to such offsets, and on a VM whose free memory goes back to the host
 * a new page-cache page can cost a host fault. Each experiment uses a scratch file in the current
 * directory, deleted afterwards.
 *
 * Default: three rounds of 2 GiB in 1 MiB writes at queue depth 1, each followed by fdatasync:
 * overwriting pages the file's first write left cached, buffered writes to new (preallocated)
 * offsets, O_DIRECT writes to new preallocated offsets, and O_DIRECT writes into a hole.
 *
 * `sizes`: 512 MiB to new preallocated offsets in writes of 4 KiB to 1 MiB, buffered and O_DIRECT,
 * two rounds: where direct starts to win (the threshold in direct.rs).
 *
 *   gcc -O2 scripts/new-offset-writes.c -o /tmp/newoff && /tmp/newoff && /tmp/newoff sizes
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MIB (1L << 20)
static const char *PATH = "new-offset-writes.scratch";

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    unlink(PATH);
    exit(1);
}

/* Writes n pieces of `size` bytes from `buf` at `base`, then syncs; returns the seconds taken. */
static double timed_writes(int fd, int sync_fd, char *buf, long size, long n, long base) {
    double t = now();
    for (long i = 0; i < n; i++) {
        buf[0] = (char)i;
        if (pwrite(fd, buf, size, base + i * size) != size)
            die("pwrite");
    }
    if (fdatasync(sync_fd))
        die("fdatasync");
    return now() - t;
}

static void offsets(char *buf) {
    long n = 2048; /* 2 GiB in 1 MiB writes */
    for (int round = 0; round < 3; round++) {
        unlink(PATH);
        int fd = open(PATH, O_RDWR | O_CREAT, 0644);
        if (fd < 0)
            die("open");
        timed_writes(fd, fd, buf, MIB, n, 0); /* the region to overwrite, left cached */
        if (fallocate(fd, 0, n * MIB, 2 * n * MIB))
            die("fallocate");
        int dfd = open(PATH, O_RDWR | O_DIRECT);
        if (dfd < 0)
            die("open O_DIRECT");
        double over = timed_writes(fd, fd, buf, MIB, n, 0);
        double fresh = timed_writes(fd, fd, buf, MIB, n, n * MIB);
        double direct = timed_writes(dfd, fd, buf, MIB, n, 2 * n * MIB);
        double hole = timed_writes(dfd, fd, buf, MIB, n, 4 * n * MIB);
        printf("round %d, MiB/s: overwrite cached %.0f, buffered new %.0f, direct new %.0f, "
               "direct into a hole %.0f\n",
               round, n / over, n / fresh, n / direct, n / hole);
        close(dfd);
        close(fd);
    }
}

static void sizes(char *buf) {
    long total = 512 * MIB;
    long sz[] = {4096, 16384, 65536, 262144, MIB};
    for (int round = 0; round < 2; round++)
        for (int s = 0; s < 5; s++) {
            unlink(PATH);
            int fd = open(PATH, O_RDWR | O_CREAT, 0644);
            int dfd = open(PATH, O_RDWR | O_DIRECT);
            if (fd < 0 || dfd < 0)
                die("open");
            if (fallocate(fd, 0, 0, 2 * total))
                die("fallocate");
            long n = total / sz[s];
            double b = timed_writes(fd, fd, buf, sz[s], n, 0);
            double d = timed_writes(dfd, fd, buf, sz[s], n, total);
            printf("round %d, %7ld-byte writes, MiB/s: buffered new %.0f, direct new %.0f\n", round,
                   sz[s], 512 / b, 512 / d);
            close(dfd);
            close(fd);
        }
}

int main(int argc, char **argv) {
    char *buf;
    if (posix_memalign((void **)&buf, 4096, MIB))
        die("posix_memalign");
    memset(buf, 0xab, MIB);
    if (argc > 1 && strcmp(argv[1], "sizes") == 0)
        sizes(buf);
    else
        offsets(buf);
    unlink(PATH);
    return 0;
}
