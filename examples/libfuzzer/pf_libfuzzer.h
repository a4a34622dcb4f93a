/* pf_libfuzzer.h - report a libFuzzer harness's crashes, coverage and stats to pfcollector.
 *
 * Wiring (in the one file that defines LLVMFuzzerTestOneInput; include it nowhere else):
 *
 *     #define PFCLIENT_IMPLEMENTATION
 *     #include "pf_libfuzzer.h"            // -I clients/c -I examples/libfuzzer
 *
 *     int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
 *         pf_libfuzzer_begin(data, size);  // connects on first use; remembers the input
 *         my_target(data, size);
 *         pf_libfuzzer_end();              // coverage bookkeeping, periodic stats/coverage
 *         return 0;
 *     }
 *
 * What it does:
 *   - Crashes. AddressSanitizer calls __asan_set_error_report_callback's callback with the
 *     whole report just before the process dies (SEGV and other signals ASan handles, heap
 *     overflows, use-after-free, ...): the current input is sent with pf_crash, type taken
 *     from the report ("SEGV", "heap-buffer-overflow", ...), signal 11/7/8/4/6 for a deadly
 *     signal (0 otherwise), exit_code 1 (ASan's), stack_trace = the report, output = its
 *     SUMMARY line. A chained SIGABRT handler covers abort()/assert(), which libFuzzer (not
 *     ASan) handles. pf_crash waits for the daemon's durable ack (bounded by the timeout; else
 *     the crash is written to the outbox), then libFuzzer carries on as usual: it still
 *     writes its crash-<sha1> file and exits.
 *     __sanitizer_set_death_callback is deliberately NOT used: there is a single death
 *     callback and libFuzzer already owns it (setting it loses the crash-* file).
 *   - Coverage (needs the link flag -Wl,--wrap=__sanitizer_cov_8bit_counters_init, else 0
 *     edges are reported). -fsanitize=fuzzer gives each edge an 8-bit counter; the wrapper
 *     learns where they are, and after each run the counters hit are OR-ed into a static
 *     bitmap (up to 2^20 edges; beyond 64 KiB of counters only every 64th run is scanned, so the count becomes a
 *     lower bound). Every PFCOLLECTOR_REPORT_MS milliseconds (default 5000) one coverage event
 *     (edges seen, new since last report, executions) and one stats event are sent.
 *   - Lifecycle: "started" on the first run; at exit (libFuzzer's -runs/-max_total_time end
 *     with exit()) final stats, "stopped" and a flush of up to 2 s.
 *   Environment: PFCOLLECTOR_SOCKET (daemon socket, default rule of docs/protocol.md),
 *   PFCOLLECTOR_JOB_ID (default "libfuzzer-local"), PFCOLLECTOR_FUZZER (default "libfuzzer"),
 *   PFCOLLECTOR_REPORT_MS (and the client's PFCOLLECTOR_OUTBOX, PFCOLLECTOR_DAEMON_UID, ...).
 *   Without a daemon a run costs a few nanoseconds more (the client fails open and retries
 *   with a backoff), stats wait in the client's ring, and a crash goes to the outbox, which
 *   the daemon imports when it is back (pfclient.h, FAIL-OPEN).
 *   No malloc; one static pf_client. Build with clang -fsanitize=fuzzer,address. The glue and
 *   the client are compiled without coverage instrumentation (clang attribute), so they add
 *   no features to libFuzzer's feedback and do not count themselves as covered edges.
 */
#ifndef PF_LIBFUZZER_H
#define PF_LIBFUZZER_H

/* The reporting code is kept out of libFuzzer's coverage feedback: it would look like
 * "new coverage" the first time it runs, and inflate the edge counts it reports. */
#ifdef __clang__
#pragma clang attribute push(__attribute__((no_sanitize("coverage"))), apply_to = function)
#endif

#include "pfclient.h"

#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Weak: the glue links without ASan (then only the SIGABRT path reports crashes). */
extern void __asan_set_error_report_callback(void (*callback)(const char *)) __attribute__((weak));
/* With -Wl,--wrap=__sanitizer_cov_8bit_counters_init, each instrumented module's edge
 * counters are announced to us first (then to libFuzzer). Reading the __sancov_cntrs section
 * through __start_/__stop_ symbols instead breaks libFuzzer's own registration (clang 14, ld.bfd
 * and gold). Without the flag __wrap_ is never called and coverage reports 0 edges. */
extern void __real___sanitizer_cov_8bit_counters_init(uint8_t *start, uint8_t *stop)
    __attribute__((weak));
void __wrap___sanitizer_cov_8bit_counters_init(uint8_t *start, uint8_t *stop);

#define PF_LF_SEEN_BITS (1u << 20)
#define PF_LF_BIG_COUNTERS (64u * 1024u)
#define PF_LF_MODULES 16

static pf_client pf_lf_client;
static struct {
    int started, reported;
    const uint8_t *data;
    size_t size;
    uint64_t runs, runs_at_report;
    int64_t started_ms, report_ms, interval_ms;
    int64_t edges, edges_at_report;
    struct sigaction prev_abrt;
    size_t nmodules, ncounters;
    const uint8_t *mod_start[PF_LF_MODULES];
    size_t mod_len[PF_LF_MODULES];
    uint8_t seen[PF_LF_SEEN_BITS / 8];
} pf_lf;

void __wrap___sanitizer_cov_8bit_counters_init(uint8_t *start, uint8_t *stop) {
    if (pf_lf.nmodules < PF_LF_MODULES && start < stop) {
        pf_lf.mod_start[pf_lf.nmodules] = start;
        pf_lf.mod_len[pf_lf.nmodules++] = (size_t)(stop - start);
        pf_lf.ncounters += (size_t)(stop - start);
    }
    if (__real___sanitizer_cov_8bit_counters_init)
        __real___sanitizer_cov_8bit_counters_init(start, stop);
}

static int64_t pf_lf_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static size_t pf_lf_counters(void) { return pf_lf.ncounters; }

/* The crash, once (ASan's report and the SIGABRT handler may both fire). */
static void pf_lf_report_crash(const char *type, int signo, int exit_code, const char *output,
                               const char *trace) {
    if (pf_lf.reported || !pf_lf.started) return;
    pf_lf.reported = 1;
    pf_crash(&pf_lf_client, type, pf_lf.data, pf_lf.data ? pf_lf.size : 0, signo, exit_code,
             output, trace);
}

/* "==1==ERROR: AddressSanitizer: SEGV on unknown address ..." -> type "SEGV", signal 11. */
static void pf_lf_asan_report(const char *report) {
    static const char marker[] = "ERROR: AddressSanitizer: ";
    static const char *const sigs[][2] = {{"SEGV", "11"}, {"BUS", "7"}, {"FPE", "8"},
                                          {"ILL", "4"},   {"ABRT", "6"}, {"TRAP", "5"}};
    char type[128] = "asan";
    char summary[512] = "";
    const char *at = strstr(report, marker), *sum = strstr(report, "SUMMARY: ");
    size_t n = 0, i;
    int signo = 0;
    if (at != NULL) {
        at += sizeof marker - 1;
        while (at[n] && at[n] != ' ' && at[n] != '\n' && at[n] != ':' && n < sizeof type - 1) {
            type[n] = at[n];
            n++;
        }
        type[n] = '\0';
    }
    for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        if (strcmp(type, sigs[i][0]) == 0) signo = atoi(sigs[i][1]);
    if (sum != NULL) {
        for (n = 0; sum[n] && sum[n] != '\n' && n < sizeof summary - 1; n++) summary[n] = sum[n];
        summary[n] = '\0';
    }
    pf_lf_report_crash(type, signo, 1, summary, report);
}

static void pf_lf_on_abrt(int signo, siginfo_t *info, void *uctx) {
    pf_lf_report_crash("abort", signo, 0, "deadly signal SIGABRT", "");
    if (pf_lf.prev_abrt.sa_flags & SA_SIGINFO) {
        if (pf_lf.prev_abrt.sa_sigaction) pf_lf.prev_abrt.sa_sigaction(signo, info, uctx);
    } else if (pf_lf.prev_abrt.sa_handler != SIG_IGN && pf_lf.prev_abrt.sa_handler != SIG_DFL) {
        pf_lf.prev_abrt.sa_handler(signo);
    }
    signal(signo, SIG_DFL); /* nobody else took over: die of it */
    raise(signo);
}

static void pf_lf_send_progress(void) {
    int64_t now = pf_lf_now_ms(), total = (int64_t)pf_lf_counters();
    double secs = (double)(now - pf_lf.report_ms) / 1000.0;
    pf_stats_t st;
    struct rusage ru;
    memset(&st, 0, sizeof st);
    st.executions = (int64_t)pf_lf.runs;
    st.exec_per_second = secs > 0 ? (double)(pf_lf.runs - pf_lf.runs_at_report) / secs : 0.0;
    st.total_edges = total;
    st.covered_edges = pf_lf.edges;
    st.coverage_percent = total ? 100.0 * (double)pf_lf.edges / (double)total : 0.0;
    if (getrusage(RUSAGE_SELF, &ru) == 0) {
        st.memory_usage = (int64_t)ru.ru_maxrss * 1024;
        if (now > pf_lf.started_ms)
            st.cpu_usage = 100.0 *
                           ((double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
                            (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6) /
                           ((double)(now - pf_lf.started_ms) / 1000.0);
    }
    pf_coverage(&pf_lf_client, pf_lf.edges, pf_lf.edges - pf_lf.edges_at_report,
                (int64_t)pf_lf.runs);
    pf_stats(&pf_lf_client, &st);
    pf_lf.report_ms = now;
    pf_lf.runs_at_report = pf_lf.runs;
    pf_lf.edges_at_report = pf_lf.edges;
}

static void pf_lf_atexit(void) {
    if (!pf_lf.started || pf_lf.reported) return;
    pf_lf_send_progress();
    pf_lifecycle(&pf_lf_client, "stopped", "libFuzzer exited");
    pf_flush(&pf_lf_client, 2000);
    pf_close(&pf_lf_client);
}

static void pf_lf_start(void) {
    const char *job = getenv("PFCOLLECTOR_JOB_ID"), *fuzzer = getenv("PFCOLLECTOR_FUZZER");
    const char *interval = getenv("PFCOLLECTOR_REPORT_MS");
    struct sigaction sa;
    pf_lf.started = 1;
    pf_lf.started_ms = pf_lf.report_ms = pf_lf_now_ms();
    pf_lf.interval_ms = (interval && atoi(interval) > 0) ? atoi(interval) : 5000;
    pf_connect(&pf_lf_client, NULL, job && *job ? job : "libfuzzer-local",
               fuzzer && *fuzzer ? fuzzer : "libfuzzer");
    pf_set_timeout(&pf_lf_client, 3000);
    pf_lifecycle(&pf_lf_client, "started", "libFuzzer harness started");
    if (__asan_set_error_report_callback) __asan_set_error_report_callback(pf_lf_asan_report);
    /* Installed now, after libFuzzer set its own SIGABRT handler, which we then chain to. */
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = pf_lf_on_abrt;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGABRT, &sa, &pf_lf.prev_abrt);
    atexit(pf_lf_atexit);
}

static inline void pf_libfuzzer_begin(const uint8_t *data, size_t size) {
    if (!pf_lf.started) pf_lf_start();
    pf_lf.data = data;
    pf_lf.size = size;
}

/* OR this run's edge counters into the seen bitmap. */
static void pf_lf_scan(void) {
    size_t m, i, bit = 0;
    for (m = 0; m < pf_lf.nmodules; m++) {
        const uint8_t *cnt = pf_lf.mod_start[m];
        for (i = 0; i < pf_lf.mod_len[m] && bit < PF_LF_SEEN_BITS; i++, bit++) {
            if (cnt[i] && !(pf_lf.seen[bit >> 3] & (1u << (bit & 7)))) {
                pf_lf.seen[bit >> 3] |= (uint8_t)(1u << (bit & 7));
                pf_lf.edges++;
            }
        }
    }
}

static inline void pf_libfuzzer_end(void) {
    pf_lf.data = NULL;
    pf_lf.runs++;
    if (pf_lf_counters() <= PF_LF_BIG_COUNTERS || (pf_lf.runs & 63) == 0) pf_lf_scan();
    if ((pf_lf.runs & 15) == 0 && pf_lf_now_ms() - pf_lf.report_ms >= pf_lf.interval_ms)
        pf_lf_send_progress();
}

#ifdef __cplusplus
}
#endif
#ifdef __clang__
#pragma clang attribute pop
#endif
#endif /* PF_LIBFUZZER_H */
