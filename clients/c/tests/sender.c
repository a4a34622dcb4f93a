/* A small program driving pfclient.h for tests/test_c_client.py.
 *
 *   sender events SOCKET            one event of each kind against a live daemon; prints
 *                                   "<kind> <id>"
 *   sender failopen SOCKET [strict] no daemon there: every call returns at once; prints
 *                                   "<call> <rc> <ms>". Fail-open (default): crashes go to
 *                                   the outbox (rc 0), other events are kept (rc 0), pf_flush
 *                                   says PF_ENOTCONN. strict: every call fails (old behaviour).
 *   sender gone SOCKET              a scripted daemon that refuses the crash, then goes away
 *   sender repl SOCKET [strict]     reads commands on stdin, one answer line each (below);
 *                                   SOCKET "default" = the default rule; $PFC_TEST_TIMEOUT_MS,
 *                                   $PFC_TEST_JOB (default job-c); $PFC_TEST_WAIT_WELCOME: a
 *                                   welcome slower than the budget is waited for (pf_flush)
 *   sender squat SOCKET             (as root) becomes uid 65534 and listens on SOCKET, prints
 *                                   "ready"; at EOF on stdin prints "received <bytes>"
 *
 * repl commands:  crash N          N crashes, input "input-<k>": "crash <rc> <id> <ms>" each
 *                 crashbig         the crash-small and crash-big of "events": "crash <rc> <id>"
 *                 reenter          pf_crash while the client is marked busy (as from a signal
 *                                  handler interrupting another call): "reenter <rc>"
 *                 stats N          N stats + N coverage: "stats <nonzero rcs> <max ms>"
 *                 lifecycle        a "started" event: "lifecycle <rc>"
 *                 flush MS         "flush <rc> <last error>"
 *                 timeout MS       pf_set_timeout: "timeout MS"
 *                 info             "info <connected> <dropped coverage> <dropped stats>
 *                                   <dropped total> <outboxed> <outbox dir>"
 *                 fork             a child reports a crash: "child <rc> <id> <pid>"
 *                 quit
 *
 * Exit status 0 when the calls behaved as the mode expects, 1 otherwise (with a reason on
 * stderr). Never dies of SIGPIPE: the library must not raise it.
 */
#define PFCLIENT_IMPLEMENTATION
#include "../pfclient.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

static pf_client pf;
static unsigned char big[300 * 1024]; /* larger than the ring: streamed straight from here */
static const unsigned char small[] = {'P', 'F', 'Z', 0, 0xff, 0x80, '\n', 'x'};

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

static void fill_big(void) {
    size_t i;
    for (i = 0; i < sizeof big; i++) big[i] = (unsigned char)(i * 7 + (i >> 9));
}

static int crash_small(void) {
    return pf_crash(&pf, "SEGV", small, sizeof small, 11, 0, "out \xff put",
                    "#0 0x1 in parse_record target.c:12\n#1 main");
}

static int crash_big(void) {
    return pf_crash(&pf, "heap-buffer-overflow", big, sizeof big, 6, 134, NULL, NULL);
}

static int connect_with(const char *sock, int strict) {
    const char *timeout = getenv("PFC_TEST_TIMEOUT_MS"), *job = getenv("PFC_TEST_JOB");
    pf_options o;
    memset(&o, 0, sizeof o);
    o.socket_path = strcmp(sock, "default") == 0 ? NULL : sock;
    o.timeout_ms = timeout ? atoi(timeout) : 0;
    o.job_id = job ? job : "job-c";
    o.fuzzer = "c-sender";
    o.strict = strict;
    return pf_connect_opts(&pf, &o);
}

static int events(const char *sock) {
    static const char *const files[] = {"queue/id:000001", "queue/id:000002,op:havoc"};
    pf_stats_t st;
    int bad = 0;
    size_t i;
    fill_big();
    const char *job = getenv("PFC_TEST_JOB");
    int rc = pf_connect(&pf, sock, job ? job : "job-c", "c-sender");
    if (rc == PF_ETIMEDOUT) rc = pf_flush(&pf, 5000); /* welcome slower than the budget */
    bad |= check("connect", rc);
    if (bad) return 1;
    bad |= check("crash-small", crash_small());
    bad |= check("crash-big", crash_big());
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
    bad |= check("flush", pf_flush(&pf, 5000));
    for (i = 0; i < 2000; i++) { /* many small frames: ring reuse, cumulative acks */
        if (pf_coverage(&pf, (int64_t)(2000 + i), 1, (int64_t)i) != 0) {
            fprintf(stderr, "coverage %u: %s\n", (unsigned)i, pf_last_error(&pf));
            bad = 1;
            break;
        }
    }
    bad |= check("flush", pf_flush(&pf, 5000));
    /* A tight loop may outrun the daemon's acks past the budget: only coverage is dropped. */
    if (pf_dropped(&pf, NULL) != pf_dropped(&pf, "coverage")) {
        fprintf(stderr, "dropped %lu events, not only coverage\n",
                (unsigned long)pf_dropped(&pf, NULL));
        bad = 1;
    }
    printf("dropped %lu\n", (unsigned long)pf_dropped(&pf, NULL));
    pf_close(&pf);
    return bad;
}

/* Every call returns within limit_ms; fail-open: events kept, crashes in the outbox. */
static int failopen(const char *sock, int strict) {
    static const char *const files[] = {"a"};
    pf_stats_t st;
    int bad = 0, rc, round;
    long t0, dt;
    memset(&st, 0, sizeof st);
#define TIMED(name, call, want)                                                                   \
    do {                                                                                          \
        t0 = now_ms();                                                                            \
        rc = (call);                                                                              \
        dt = now_ms() - t0;                                                                       \
        printf("%s %d %ld\n", name, rc, dt);                                                      \
        if (rc != (want) || dt > 1000) bad = 1;                                                   \
    } while (0)
    TIMED("connect", connect_with(sock, strict), PF_ENOTCONN);
    pf_set_timeout(&pf, 2000);
    for (round = 0; round < 50; round++) { /* the backoff makes these nearly free */
        TIMED("crash", pf_crash(&pf, "SEGV", "x", 1, 11, 0, NULL, NULL),
              strict ? PF_ENOTCONN : PF_OK);
        TIMED("coverage", pf_coverage(&pf, 1, 0, 0), strict ? PF_ENOTCONN : PF_OK);
        TIMED("corpus", pf_corpus(&pf, files, 1, 1), strict ? PF_ENOTCONN : PF_OK);
        TIMED("stats", pf_stats(&pf, &st), strict ? PF_ENOTCONN : PF_OK);
        TIMED("flush", pf_flush(&pf, 1000), PF_ENOTCONN);
    }
    printf("last_error %s\n", pf_last_error(&pf));
    pf_close(&pf);
    return bad;
}

/* The scripted daemon welcomes us, refuses the crash (error + ack), then closes and vanishes. */
static int gone(const char *sock) {
    int bad = 0, rc, i;
    long t0 = now_ms();
    rc = pf_connect(&pf, sock, "job-c", "c-sender");
    if (rc == PF_ETIMEDOUT) rc = pf_flush(&pf, 5000); /* welcome slower than the budget */
    bad |= check("connect", rc);
    if (bad) return 1;
    pf_set_timeout(&pf, 2000);
    rc = pf_crash(&pf, "SEGV", "boom", 4, 11, 0, NULL, NULL);
    printf("crash %d %s\n", rc, pf_last_error(&pf));
    if (rc != PF_EREJECTED || strstr(pf_last_error(&pf), "too_long") == NULL) bad = 1;
    for (i = 0; i < 100; i++) { /* the daemon is gone: kept or in the outbox, never SIGPIPE */
        rc = pf_coverage(&pf, i, 0, 0);
        if (rc != 0) bad = 1;
        rc = pf_crash(&pf, "SEGV", "boom", 4, 11, 0, NULL, NULL);
        if (rc != 0) bad = 1;
        else printf("outboxed %s\n", pf_last_event_id(&pf));
    }
    rc = pf_flush(&pf, 500);
    printf("flush %d %s\n", rc, pf_last_error(&pf));
    if (rc == 0) bad = 1;
    printf("elapsed %ld\n", now_ms() - t0);
    pf_close(&pf);
    return bad;
}

static int repl(const char *sock, int strict) {
    char line[256], cmd[32];
    long arg, k, counter = 0;
    int rc;
    fill_big();
    rc = connect_with(sock, strict);
    if (rc == PF_ETIMEDOUT && getenv("PFC_TEST_WAIT_WELCOME")) rc = pf_flush(&pf, 10000);
    printf("connect %d %s\n", rc, pf_last_error(&pf));
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) != NULL) {
        arg = 0;
        if (sscanf(line, "%31s %ld", cmd, &arg) < 1) continue;
        if (strcmp(cmd, "crash") == 0) {
            for (k = 0; k < arg; k++) {
                char input[64];
                long t0 = now_ms();
                int n = snprintf(input, sizeof input, "input-%ld-%ld", (long)getpid(), counter++);
                rc = pf_crash(&pf, "SEGV", input, (size_t)n, 11, 0, "output", "#0 main");
                printf("crash %d %s %ld\n", rc, pf_last_event_id(&pf), now_ms() - t0);
            }
        } else if (strcmp(cmd, "crashbig") == 0) {
            rc = crash_small();
            printf("crash %d %s\n", rc, pf_last_event_id(&pf));
            rc = crash_big();
            printf("crash %d %s\n", rc, pf_last_event_id(&pf));
        } else if (strcmp(cmd, "reenter") == 0) {
            pf.busy = 1;
            rc = pf_crash(&pf, "SEGV", small, sizeof small, 11, 0, "in a handler", "#0 handler");
            pf.busy = 0;
            printf("reenter %d\n", rc);
        } else if (strcmp(cmd, "stats") == 0) {
            pf_stats_t st;
            long worst = 0, nonzero = 0;
            memset(&st, 0, sizeof st);
            for (k = 0; k < arg; k++) {
                long t0 = now_ms(), dt;
                st.executions = k;
                if (pf_stats(&pf, &st) != 0) nonzero++;
                if (pf_coverage(&pf, k, 1, k) != 0) nonzero++;
                dt = now_ms() - t0;
                if (dt > worst) worst = dt;
            }
            printf("stats %ld %ld\n", nonzero, worst);
        } else if (strcmp(cmd, "lifecycle") == 0) {
            printf("lifecycle %d\n", pf_lifecycle(&pf, "started", "from the repl"));
        } else if (strcmp(cmd, "flush") == 0) {
            rc = pf_flush(&pf, (int)arg);
            printf("flush %d %s\n", rc, pf_last_error(&pf));
        } else if (strcmp(cmd, "timeout") == 0) {
            pf_set_timeout(&pf, (int)arg);
            printf("timeout %ld\n", arg);
        } else if (strcmp(cmd, "info") == 0) {
            printf("info %d %lu %lu %lu %lu %s\n", pf_is_connected(&pf),
                   (unsigned long)pf_dropped(&pf, "coverage"),
                   (unsigned long)pf_dropped(&pf, "stats"), (unsigned long)pf_dropped(&pf, NULL),
                   (unsigned long)pf_outboxed(&pf), pf_outbox_dir(&pf));
        } else if (strcmp(cmd, "fork") == 0) { /* the child reports a crash on its own */
            pid_t child;
            fflush(stdout);
            child = fork();
            if (child == 0) {
                rc = pf_crash(&pf, "SEGV", "child", 5, 11, 0, NULL, NULL);
                printf("child %d %s %ld\n", rc, pf_last_event_id(&pf), (long)getpid());
                fflush(stdout);
                _exit(0);
            }
            waitpid(child, NULL, 0);
        } else if (strcmp(cmd, "quit") == 0) {
            break;
        } else {
            printf("unknown %s\n", cmd);
        }
        fflush(stdout);
    }
    pf_close(&pf);
    return 0;
}

/* Another local user squatting the daemon's socket path: counts what clients hand it. */
static int squat(const char *path) {
    struct sockaddr_un addr;
    struct pollfd fds[2];
    long received = 0;
    int lfd, conn = -1;
    if (setgid(65534) != 0 || setuid(65534) != 0) {
        perror("setuid(65534)");
        return 1;
    }
    lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 16) != 0) {
        perror("squat: bind/listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        char buf[4096];
        fds[0].fd = 0;
        fds[0].events = POLLIN;
        fds[1].fd = conn >= 0 ? conn : lfd;
        fds[1].events = POLLIN;
        if (poll(fds, 2, -1) < 0) continue;
        if (fds[0].revents) {
            if (read(0, buf, sizeof buf) <= 0) break;
        }
        if (fds[1].revents && conn < 0) {
            conn = accept(lfd, NULL, NULL);
        } else if (fds[1].revents) {
            ssize_t n = read(conn, buf, sizeof buf);
            if (n > 0) received += n;
            else {
                close(conn);
                conn = -1;
            }
        }
    }
    printf("received %ld\n", received);
    unlink(path);
    return 0;
}

int main(int argc, char **argv) {
    int strict = argc == 4 && strcmp(argv[3], "strict") == 0;
    if (argc != 3 && !strict) {
        fprintf(stderr, "usage: sender events|failopen|gone|repl SOCKET [strict]\n");
        return 2;
    }
    if (strcmp(argv[1], "events") == 0) return events(argv[2]);
    if (strcmp(argv[1], "failopen") == 0) return failopen(argv[2], strict);
    if (strcmp(argv[1], "gone") == 0) return gone(argv[2]);
    if (strcmp(argv[1], "repl") == 0) return repl(argv[2], strict);
    if (strcmp(argv[1], "squat") == 0) return squat(argv[2]);
    return 2;
}
