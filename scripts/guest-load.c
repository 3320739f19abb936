/* cairn-load: the test guest's disk load generator (scripts/build-guest.sh builds it statically
 * into the guest, where fio and its libraries would not fit). It runs time-based jobs on a block
 * device with O_DIRECT, `qd` threads each keeping one request in flight (so qd requests are in
 * flight at once, as fio's psync engine with numjobs), and prints one JSON line per job:
 *
 *   cairn-load DEVICE SECONDS RAMP_SECONDS JOB...      JOB = RW:BS:QD
 *   RW: randread | randwrite | randrw70 (70% reads) | read | write (sequential)
 *
 * Latencies are counted after the ramp, per microsecond up to 1 s, so p50 and p99 are exact to
 * the microsecond. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_US 1000000

struct job {
    char name[64];
    int reads_pct; /* 100 reads only, 0 writes only */
    int sequential;
    size_t bs;
    int qd;
};

struct worker {
    pthread_t t;
    const struct job *job;
    int fd;
    uint64_t span, start, seed;
    double t0, ramp_end, end;
    uint64_t ops, bytes, errors;
    uint32_t *hist; /* microseconds -> count */
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t next_rand(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void *run(void *arg) {
    struct worker *w = arg;
    const struct job *j = w->job;
    void *buf;
    if (posix_memalign(&buf, 4096, j->bs)) return NULL;
    for (size_t i = 0; i < j->bs; i++) ((unsigned char *)buf)[i] = (unsigned char)next_rand(&w->seed);
    uint64_t blocks = w->span / j->bs, seq = w->start / j->bs;
    for (;;) {
        double t = now();
        if (t >= w->end) break;
        uint64_t block = j->sequential ? (seq++ % blocks) : next_rand(&w->seed) % blocks;
        int read = (int)(next_rand(&w->seed) % 100) < j->reads_pct;
        ssize_t n = read ? pread(w->fd, buf, j->bs, block * j->bs)
                         : pwrite(w->fd, buf, j->bs, block * j->bs);
        double done = now();
        if (n != (ssize_t)j->bs) w->errors++;
        if (t >= w->ramp_end) {
            uint64_t us = (uint64_t)((done - t) * 1e6);
            w->hist[us < MAX_US ? us : MAX_US - 1]++;
            w->ops++;
            w->bytes += j->bs;
        }
    }
    free(buf);
    return NULL;
}

static int parse_job(const char *s, struct job *j) {
    char rw[32];
    unsigned long bs;
    char unit = 0;
    int qd;
    memset(j, 0, sizeof *j);
    snprintf(j->name, sizeof j->name, "%s", s);
    if (sscanf(s, "%31[a-z0-9]:%lu%c:%d", rw, &bs, &unit, &qd) != 4) return -1;
    if (unit == 'k') bs <<= 10;
    else if (unit == 'm') bs <<= 20;
    else return -1;
    j->bs = bs;
    j->qd = qd;
    if (!strcmp(rw, "randread")) j->reads_pct = 100;
    else if (!strcmp(rw, "randwrite")) j->reads_pct = 0;
    else if (!strcmp(rw, "randrw70")) j->reads_pct = 70;
    else if (!strcmp(rw, "read")) { j->reads_pct = 100; j->sequential = 1; }
    else if (!strcmp(rw, "write")) { j->reads_pct = 0; j->sequential = 1; }
    else return -1;
    return (qd >= 1 && qd <= 64 && bs >= 512 && bs % 512 == 0) ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: cairn-load DEVICE SECONDS RAMP JOB...\n");
        return 2;
    }
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    uint64_t size = 0;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0 || size == 0) {
        printf("cairn-load: {\"error\": \"cannot open %s as a block device\"}\n", argv[1]);
        return 1;
    }
    double secs = atof(argv[2]), ramp = atof(argv[3]);
    for (int a = 4; a < argc; a++) {
        struct job j;
        if (parse_job(argv[a], &j)) {
            printf("cairn-load: {\"job\": \"%s\", \"error\": \"not RW:BS:QD\"}\n", argv[a]);
            continue;
        }
        struct worker *w = calloc(j.qd, sizeof *w);
        double t0 = now();
        for (int i = 0; i < j.qd; i++) {
            w[i] = (struct worker){.job = &j, .fd = fd, .span = size,
                .start = size / j.qd * i, .seed = 0x9e3779b97f4a7c15ull * (i + 1) + a,
                .t0 = t0, .ramp_end = t0 + ramp, .end = t0 + ramp + secs,
                .hist = calloc(MAX_US, sizeof(uint32_t))};
            pthread_create(&w[i].t, NULL, run, &w[i]);
        }
        uint64_t ops = 0, bytes = 0, errors = 0;
        for (int i = 0; i < j.qd; i++) {
            pthread_join(w[i].t, NULL);
            ops += w[i].ops;
            bytes += w[i].bytes;
            errors += w[i].errors;
        }
        uint64_t p50 = 0, p99 = 0, seen = 0;
        for (uint64_t us = 0; us < MAX_US && ops; us++) {
            for (int i = 0; i < j.qd; i++) seen += w[i].hist[us];
            if (!p50 && seen * 100 >= ops * 50) p50 = us + 1;
            if (!p99 && seen * 100 >= ops * 99) { p99 = us + 1; break; }
        }
        printf("cairn-load: {\"job\": \"%s\", \"seconds\": %.1f, \"ops\": %llu, \"iops\": %.0f, "
               "\"mib_s\": %.1f, \"p50_us\": %llu, \"p99_us\": %llu, \"errors\": %llu}\n",
               j.name, secs, (unsigned long long)ops, ops / secs, bytes / secs / 1048576.0,
               (unsigned long long)p50, (unsigned long long)p99, (unsigned long long)errors);
        fflush(stdout);
        for (int i = 0; i < j.qd; i++) free(w[i].hist);
        free(w);
    }
    close(fd);
    return 0;
}
