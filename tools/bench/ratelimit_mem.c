/*
 * ratelimit_mem.c — what a flood of distinct agents costs the rate limiter: inserts N
 * (default 1,000,000) agent keys into a ratelimiter with the default bound, then prints
 * one line: keys, bytes by its own count and by RSS, bytes per key (by RSS), and time per
 * take: inserting a new key, taking from one of the N known keys (scattered over memory,
 * mostly cache misses), and from one of 1000 known keys (cache-hot, the usual case).
 *
 * Usage: ratelimit_mem [N]
 */
#include "pep/ratelimit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double rss_bytes(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &pages, &resident) != 2) {
        fprintf(stderr, "ratelimit_mem: cannot read /proc/self/statm\n");
        exit(1);
    }
    fclose(f);
    return (double)resident * (double)sysconf(_SC_PAGESIZE);
}

/* This thread's CPU time: other work on a shared box does not count, page faults do. */
static int64_t cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Takes one request for each of n agent keys ("llm.chat␟agent␟600␟60000000␟agent-000123",
 * 40 bytes, as the caller builds them); returns ns per take. */
static double take_all(struct ratelimiter *rl, long n, int64_t now_us) {
    static const char prefix[] = "llm.chat\x1f"
                                 "agent\x1f"
                                 "600\x1f"
                                 "60000000\x1f"
                                 "agent-";
    char key[64];
    memcpy(key, prefix, sizeof prefix - 1);
    int64_t start = cpu_ns();
    for (long i = 0; i < n; i++) {
        char *p = key + sizeof prefix - 1;
        for (long d = 100000; d > 0; d /= 10) /* 6 digits; cheaper than snprintf */
            *p++ = (char)('0' + i / d % 10);
        struct ratelimit_verdict v;
        if (ratelimit_take(rl, key, (size_t)(p - key), 600, 60000000, 1, now_us, &v) != 0 ||
            !v.allowed) {
            fprintf(stderr, "ratelimit_mem: take %ld failed\n", i);
            exit(1);
        }
    }
    return (double)(cpu_ns() - start) / (double)n;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 1000000;
    if (n < 1 || n > 1000000) {
        fprintf(stderr, "usage: ratelimit_mem [N ≤ 1000000]\n");
        return 2;
    }
    double rss0 = rss_bytes();
    struct ratelimiter *rl = ratelimiter_new(0);
    if (!rl) {
        fprintf(stderr, "ratelimit_mem: ratelimiter_new failed\n");
        return 1;
    }
    const int64_t now_us = 1700000000LL * 1000000; /* one instant: every key stays busy */
    double insert_ns = take_all(rl, n, now_us);
    double rss1 = rss_bytes();
    double hit_ns = take_all(rl, n, now_us);
    double hot_ns = 0; /* one request per key every 100 ms: the refill rate, all allowed */
    long hot = n < 1000 ? n : 1000;
    for (int round = 1; round <= 1000; round++)
        hot_ns += take_all(rl, hot, now_us + round * 100000) / 1000;
    struct ratelimit_stats st;
    ratelimiter_stats(rl, &st);
    printf("ratelimit: %zu keys, %.1f MiB (RSS delta %.1f MiB), %.0f bytes/key, "
           "take %.0f ns/op (new key), %.0f ns/op (any of %ld keys), %.0f ns/op (one of %ld), "
           "%llu evicted\n",
           st.keys, (double)st.bytes / 1048576, (rss1 - rss0) / 1048576,
           (rss1 - rss0) / (double)st.keys, insert_ns, hit_ns, n, hot_ns, hot,
           (unsigned long long)st.evicted);
    ratelimiter_free(rl);
    return 0;
}
