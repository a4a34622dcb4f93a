/* A small program driving pfclient.h for tests/test_c_client.py.
 *
 *   sender events SOCKET    one event of each kind against a live daemon; prints "<kind> <id>"
 *   sender failopen SOCKET  no daemon there: every call must fail fast; prints "<call> <rc> <ms>"
 *   sender gone SOCKET      a scripted daemon that refuses the crash, then goes away
 *
 * Exit status 0 when the calls behaved as the mode expects, 1 otherwise (with a reason on
 * stderr). Never dies of SIGPIPE: the library must not raise it.
 */
#define PFCLIENT_IMPLEMENTATION
#include "../pfclient.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

static pf_client pf;
static unsigned char big[300 * 1024]; /* larger than the ring: streamed straight from here */

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int check(const char *what, int rc) {
    if (rc != 0) {
        fprintf(stderr, "%s: %s (%s)\n", what, pf_strerror(rc), pf_last_error(&pf));
        return 1;
    }
    printf("%s %s\n", what, pf_last_event_id(&pf));
    return 0;
}

static int events(const char *sock) {
    static const unsigned char small[] = {'P', 'F', 'Z', 0, 0xff, 0x80, '\n', 'x'};
    static const char *const files[] = {"queue/id:000001", "queue/id:000002,op:havoc"};
    pf_stats_t st;
    int bad = 0;
    size_t i;
    for (i = 0; i < sizeof big; i++) big[i] = (unsigned char)(i * 7 + (i >> 9));
    bad |= check("connect", pf_connect(&pf, sock, "job-c", "c-sender"));
    if (bad) return 1;
    bad |= check("crash-small", pf_crash(&pf, "SEGV", small, sizeof small, 11, 0, "out \xff put",
                                         "#0 0x1 in parse_record target.c:12\n#1 main"));
    bad |= check("crash-big", pf_crash(&pf, "heap-buffer-overflow", big, sizeof big, 6, 134,
                                       NULL, NULL));
    bad |= check("coverage", pf_coverage(&pf, 1500, 3, 100000));
    bad |= check("corpus", pf_corpus(&pf, files, 2, 2048));
    memset(&st, 0, sizeof st);
    st.executions = 123456;
    st.exec_per_second = 8500.5;
    st.total_edges = 4000;
    st.covered_edges = 1500;
    st.coverage_percent = 37.5;
    st.unique_crashes = 2;
    st.total_crashes = 2;
    st.corpus_size = 312;
    st.cpu_usage = 99.5;
    st.memory_usage = 1 << 20;
    bad |= check("stats", pf_stats(&pf, &st));
    bad |= check("started", pf_lifecycle(&pf, "started", "hello from C"));
    for (i = 0; i < 2000; i++) { /* many small frames: ring reuse, cumulative acks */
        if (pf_coverage(&pf, (int64_t)(2000 + i), 1, (int64_t)i) != 0) {
            fprintf(stderr, "coverage %u: %s\n", (unsigned)i, pf_last_error(&pf));
            bad = 1;
            break;
        }
    }
    bad |= check("flush", pf_flush(&pf, 5000));
    pf_close(&pf);
    return bad;
}

/* Every call returns a negative code within limit_ms; nothing crashes. */
static int failopen(const char *sock) {
    static const char *const files[] = {"a"};
    pf_stats_t st;
    int bad = 0, rc, round;
    long t0, dt;
    memset(&st, 0, sizeof st);
    pf_set_timeout(&pf, 2000);
#define TIMED(name, call)                                                                         \
    do {                                                                                          \
        t0 = now_ms();                                                                            \
        rc = (call);                                                                              \
        dt = now_ms() - t0;                                                                       \
        printf("%s %d %ld\n", name, rc, dt);                                                      \
        if (rc >= 0 || dt > 200) bad = 1;                                                         \
    } while (0)
    TIMED("connect", pf_connect(&pf, sock, "job-c", "c-sender"));
    for (round = 0; round < 200; round++) { /* the backoff makes these nearly free */
        TIMED("crash", pf_crash(&pf, "SEGV", "x", 1, 11, 0, NULL, NULL));
        TIMED("coverage", pf_coverage(&pf, 1, 0, 0));
        TIMED("corpus", pf_corpus(&pf, files, 1, 1));
        TIMED("stats", pf_stats(&pf, &st));
        TIMED("flush", pf_flush(&pf, 1000));
    }
    printf("last_error %s\n", pf_last_error(&pf));
    pf_close(&pf);
    return bad;
}

/* The scripted daemon welcomes us, refuses the crash (error + ack), then closes and vanishes. */
static int gone(const char *sock) {
    int bad = 0, rc, i;
    long t0 = now_ms();
    pf_set_timeout(&pf, 2000);
    bad |= check("connect", pf_connect(&pf, sock, "job-c", "c-sender"));
    if (bad) return 1;
    rc = pf_crash(&pf, "SEGV", "boom", 4, 11, 0, NULL, NULL);
    printf("crash %d %s\n", rc, pf_last_error(&pf));
    if (rc != PF_EREJECTED || strstr(pf_last_error(&pf), "too_long") == NULL) bad = 1;
    for (i = 0; i < 100; i++) { /* the daemon is gone: errors, never SIGPIPE */
        rc = pf_coverage(&pf, i, 0, 0);
        if (rc > 0) bad = 1;
        rc = pf_crash(&pf, "SEGV", "boom", 4, 11, 0, NULL, NULL);
        if (rc == 0) bad = 1;
    }
    rc = pf_flush(&pf, 500);
    printf("flush %d %s\n", rc, pf_last_error(&pf));
    if (rc == 0) bad = 1;
    printf("elapsed %ld\n", now_ms() - t0);
    pf_close(&pf);
    return bad;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: sender events|failopen|gone SOCKET\n");
        return 2;
    }
    if (strcmp(argv[1], "events") == 0) return events(argv[2]);
    if (strcmp(argv[1], "failopen") == 0) return failopen(argv[2]);
    if (strcmp(argv[1], "gone") == 0) return gone(argv[2]);
    return 2;
}
