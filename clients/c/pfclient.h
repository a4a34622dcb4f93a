/* pfclient.h - a single-header C client for the pfcollector daemon (wire protocol version 1).
 *
 * No dependencies beyond libc/POSIX, C99, includable from C++. The protocol is specified in
 * docs/protocol.md; this file carries its own small msgpack writer and a reader for the
 * daemon's welcome/ack/error frames.
 *
 * USAGE (stb style): in exactly ONE C or C++ file, define PFCLIENT_IMPLEMENTATION before
 * including this header; every other file includes it plainly. In that one file, include
 * pfclient.h BEFORE any system header (it needs POSIX declarations, which it enables with
 * _POSIX_C_SOURCE when nothing else did), or compile with -D_GNU_SOURCE / -D_DEFAULT_SOURCE.
 *
 *     #define PFCLIENT_IMPLEMENTATION
 *     #include "pfclient.h"
 *
 *     static pf_client pf;                       // ~76 KiB: make it static, not a stack local
 *     pf_connect(&pf, NULL, "job-42", "libfuzzer"); // NULL = default socket path (see below)
 *     pf_stats_t st; memset(&st, 0, sizeof st); st.executions = n; pf_stats(&pf, &st);
 *     pf_coverage(&pf, edges, new_edges, n);
 *     pf_crash(&pf, "SEGV", data, size, 11, 0, "", report);  // durable: daemon's disk or outbox
 *     pf_flush(&pf, 2000);
 *     pf_close(&pf);
 *
 * FAIL-OPEN (the default): whatever the daemon does (absent, killed, hung, refused as an
 * impostor), the harness keeps fuzzing and no crash is lost:
 *   - pf_stats, pf_coverage, pf_corpus, pf_lifecycle never wait longer than budget_ms
 *     (default 5 ms, pf_options.budget_ms) plus a few system calls. Their event is encoded
 *     into a fixed ring (PF_RING_SIZE bytes, default 64 KiB; no malloc) and kept there until
 *     the daemon acknowledges it; while the daemon is away the ring keeps filling, and when it
 *     is full the oldest stats and coverage events are dropped first (then the oldest of any
 *     kind), each counted (pf_dropped). They return 0 in all these cases.
 *   - The connection is re-made inside later calls (backoff 100 ms doubling to 5 s, reset by
 *     the first ack on a new connection, not by its welcome; the call
 *     that reconnects waits at most the budget for the welcome, the handshake goes on in the
 *     calls after), and every kept event is resent with the SAME id and a fresh seq.
 *   - pf_crash waits (up to timeout_ms, default 5000) for the daemon's durable ack. Without
 *     one (no daemon, connection refused or broken twice, impostor, no ack in time) it writes
 *     the crash into the OUTBOX and returns 0: <outbox>/<id>.pfev holding the hello and the
 *     event frame (docs/protocol.md, "The outbox"), written to a temporary file (0640,
 *     O_EXCL|O_NOFOLLOW), fsynced, renamed, directory fsynced. The daemon imports it at start
 *     and every few seconds, under the same id: a crash that also reached the daemon over the
 *     socket is stored once. Outbox: the daemon's (from its welcome, once connected), else
 *     pf_options.outbox, $PFCOLLECTOR_OUTBOX, else <data dir>/outbox with the daemon's rule
 *     ($PFCOLLECTOR_DATA_DIR, $XDG_DATA_HOME/pfcollector, ~/.local/share/pfcollector); created
 *     (0750) if missing. After a crash got no answer in time (a hung daemon), later crashes
 *     go straight to the outbox until a welcome comes again. pf_crash returns an error only
 *     when the outbox cannot be written either (PF_EOUTBOX), when the daemon refused the
 *     crash as invalid (PF_EREJECTED: it would refuse the file too; "not now" refusals,
 *     spool_full, disk_full and spool_write_failed, send it to the outbox), or for a bad
 *     argument. pf_close writes kept lifecycle and corpus events to the outbox.
 *   pf_options.strict = 1 keeps the fail-closed behaviour instead: without a welcomed
 *   connection every call returns its error code (PF_ENOTCONN, PF_EUNTRUSTED, ...) and the
 *   event is not kept; a full ring waits for acks up to timeout_ms; nothing goes to the outbox.
 *
 * TRUST: right after connect(), before a byte is sent, the client reads the listener's uid
 * from the kernel (SO_PEERCRED on Linux, getpeereid on the BSDs and macOS; no check on other
 * systems). It must be our own uid (real or effective), root, or the uid given in
 * pf_options.daemon_uid / $PFCOLLECTOR_DAEMON_UID. Anything else is refused (PF_EUNTRUSTED, the
 * error names the socket and the uid found); fail-open, that refusal is also written once to
 * stderr, and crashes go to the outbox. The default socket is $PFCOLLECTOR_SOCKET, else
 * $XDG_RUNTIME_DIR/pfcollector.sock, else /tmp/pfcollector-<uid>/pfcollector.sock (a private
 * directory the daemon creates). pf_connect reads the environment with secure_getenv where
 * the C library has it (glibc), so a set-uid program ignores its caller's settings.
 *
 * API (every int-returning call: 0 = success, a negative PF_E* code otherwise):
 *
 *   int  pf_connect(pf_client *c, const char *socket_path, const char *job_id,
 *                   const char *fuzzer);
 *   int  pf_connect_opts(pf_client *c, const pf_options *options);
 *        Initialise *c and connect (hello, then waits for the welcome: at most budget_ms, or
 *        timeout_ms when strict; PF_ETIMEDOUT while the handshake goes on). job_id and
 *        fuzzer must be 1..256 characters of valid UTF-8 without control characters
 *        (PF_EINVAL; then the client stays unusable). Any other failure (PF_ENOTCONN,
 *        PF_ETIMEDOUT, PF_EPROTO, PF_EUNTRUSTED) leaves a usable client that keeps trying.
 *        pf_connect(c, path, job, fuzzer) is pf_connect_opts with everything else default.
 *   void pf_set_timeout(pf_client *c, int timeout_ms);     The waits of pf_crash (default 5000)
 *   int  pf_crash(pf_client *c, const char *type, const void *input, size_t input_len,
 *                 int signal, int exit_code, const char *output, const char *stack_trace);
 *        Sends a crash and waits for its durable ack, else writes it to the outbox (above). On
 *        a broken connection it reconnects once and resends with the same id. The input is
 *        written straight from the caller's buffer (no copy, up to 10 MiB); type is cut to 256
 *        bytes, output and stack_trace to 65536 bytes, at a UTF-8 boundary; NULL output /
 *        stack_trace mean "". Re-entered (from a signal handler that interrupted another call
 *        of this client), it writes the crash to the outbox only, under an id of a series of
 *        its own (strict: PF_EBUSY).
 *   int  pf_coverage(pf_client *c, int64_t edges, int64_t new_edges, int64_t exec_count);
 *   int  pf_corpus(pf_client *c, const char *const *files, size_t nfiles, int64_t total_size);
 *        1..1024 names of at most 4096 characters each, and the whole event must fit in
 *        PF_RING_SIZE (else PF_ETOOBIG: split the list over several calls).
 *   int  pf_stats(pf_client *c, const pf_stats_t *stats);     (the fuzzer_stats fields)
 *   int  pf_lifecycle(pf_client *c, const char *kind, const char *message);
 *        kind is "started", "stopped", "error" or "timeout"; message cut to 65536 bytes.
 *        These four do not wait beyond the budget (above).
 *   int  pf_flush(pf_client *c, int timeout_ms);
 *        Waits until the daemon has acknowledged every kept event (tries to connect at once,
 *        whatever the backoff). PF_ENOTCONN when no daemon is there (the events stay kept);
 *        PF_EREJECTED when events were refused since the previous flush (pf_last_error says
 *        the last one).
 *   void pf_close(pf_client *c);      Closes the socket (no flush); kept lifecycle and corpus
 *                                     events go to the outbox (fail-open), stats and coverage
 *                                     are forgotten; later pf_crash calls still reach the
 *                                     outbox. Idempotent.
 *   int  pf_is_connected(const pf_client *c);             welcomed connection open
 *   const char *pf_last_error(const pf_client *c);        human-readable, "" when none
 *   const char *pf_last_event_id(const pf_client *c);     id of the last event built
 *   const char *pf_outbox_dir(const pf_client *c);        where a crash would go now
 *   uint64_t pf_dropped(const pf_client *c, const char *kind);  events dropped from the full
 *                                     ring, of that kind ("stats", "coverage", ...; NULL: all)
 *   uint64_t pf_outboxed(const pf_client *c);             crashes written to the outbox
 *   const char *pf_strerror(int code);
 *
 * ERRORS: PF_EINVAL bad argument (nothing sent); PF_ENOTCONN daemon unreachable; PF_ETIMEDOUT
 * no acknowledgement in time; PF_EREJECTED the daemon refused the event (non-fatal);
 * PF_ETOOBIG larger than the daemon's max_frame / 10 MiB input / the ring; PF_EPROTO the
 * daemon refused the hello or sent garbage; PF_EBUSY the client is already inside a call;
 * PF_EUNTRUSTED the socket's listener runs as an untrusted uid; PF_EOUTBOX no ack and the
 * outbox could not be written.
 *
 * SIGNALS: the re-entry guard is a volatile sig_atomic_t, errno is preserved, and after
 * pf_connect returned every call below uses only async-signal-safe functions (POSIX.1-2008,
 * 2016 edition: socket, connect, getsockopt, send, recv, poll, clock_gettime, getpid, getuid,
 * geteuid, open, read, write, fsync, rename, unlink, mkdir, close, fcntl; and memcpy, memmove,
 * memset, memcmp, memchr, strlen, strcmp): pf_crash, pf_stats, pf_coverage, pf_corpus,
 * pf_lifecycle, pf_flush, pf_close, pf_is_connected, pf_last_error, pf_last_event_id,
 * pf_outbox_dir, pf_dropped, pf_outboxed, pf_strerror. So pf_crash may be called from a
 * signal handler or a sanitizer callback. NOT async-signal-safe: pf_connect and
 * pf_connect_opts (they read the environment and getcwd): call them from normal code, before
 * installing handlers.
 * A handler that interrupts another call of the same client gets PF_EBUSY from every call
 * except pf_crash, which then goes to the outbox (above).
 *
 * ALSO: no malloc anywhere (all buffers live inside pf_client); MSG_NOSIGNAL (no SIGPIPE);
 * not thread-safe (one client per thread, or a lock around calls). After fork() the child
 * notices (getpid) and opens its own connection; the parent's kept events stay the parent's.
 * Strings are sent as msgpack str; bytes that are not valid UTF-8 are replaced by '?'. Event
 * ids are UUID-formatted: 16 random bytes from /dev/urandom per process plus a counter.
 *
 * CONFIGURATION (define before every include, identically in all files: the struct layout
 * depends on it): PF_RING_SIZE (default 65536) bytes kept for unacknowledged events.
 */
#ifndef PFCLIENT_H
#define PFCLIENT_H

#if defined(PFCLIENT_IMPLEMENTATION) && !defined(_POSIX_C_SOURCE) && !defined(_XOPEN_SOURCE) && \
    !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE) && !defined(_BSD_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#ifndef PF_RING_SIZE
#define PF_RING_SIZE (64 * 1024)
#endif
#define PF_RBUF_SIZE 4096
#define PF_DEFAULT_TIMEOUT_MS 5000
#define PF_DEFAULT_BUDGET_MS 5
#define PF_NKINDS 8 /* crash coverage corpus stats started stopped error timeout */

#define PF_OK 0
#define PF_EINVAL (-1)
#define PF_ENOTCONN (-2)
#define PF_ETIMEDOUT (-3)
#define PF_EREJECTED (-4)
#define PF_ETOOBIG (-5)
#define PF_EPROTO (-6)
#define PF_EBUSY (-7)
#define PF_EUNTRUSTED (-8)
#define PF_EOUTBOX (-9)

#ifdef __cplusplus
extern "C" {
#endif

/* The fuzzer_stats fields of a "stats" event (docs/protocol.md). Zero what you do not know. */
typedef struct pf_stats_t {
    int64_t executions;
    double exec_per_second;
    int64_t total_edges;
    int64_t covered_edges;
    double coverage_percent;
    int64_t unique_crashes;
    int64_t total_crashes;
    int64_t corpus_size;
    double cpu_usage;
    int64_t memory_usage;
} pf_stats_t;

/* Options of pf_connect_opts. memset it to 0 first: every 0 / NULL means the default. */
typedef struct pf_options {
    const char *socket_path; /* NULL: the default rule (see pf_connect) */
    const char *job_id;      /* required */
    const char *fuzzer;      /* required */
    int timeout_ms;          /* waits of pf_connect, pf_crash, pf_flush; 0: 5000 */
    int budget_ms;           /* the most a non-waiting call may wait; 0: 5 */
    int strict;              /* 1: fail closed (errors instead of queueing and the outbox) */
    const char *outbox;      /* NULL: $PFCOLLECTOR_OUTBOX, else <data dir>/outbox */
    long daemon_uid;         /* > 0: also trust this uid (besides $PFCOLLECTOR_DAEMON_UID) */
} pf_options;

/* Treat as opaque; the fields are public only so it can be allocated statically. */
typedef struct pf_client {
    int fd;                        /* -1 when not connected */
    volatile sig_atomic_t busy;    /* inside a call (re-entrancy guard) */
    int welcomed, refused, crash_rejected, crash_retry, strict, ntrust, refusal_logged, last_rc;
    int hung;                      /* a crash got no answer in time: crashes skip the wait */
    volatile sig_atomic_t outbox_learned; /* outbox_daemon holds the welcome's outbox */
    int timeout_ms, budget_ms, backoff_ms;
    long pid;                      /* owner process, to notice fork() */
    unsigned long trust_uids[8];   /* daemon_uid and $PFCOLLECTOR_DAEMON_UID */
    int64_t retry_at_ms;           /* no connection attempt before this (monotonic ms) */
    int64_t hs_deadline_ms;        /* the welcome must come before this */
    uint64_t seq, acked, crash_seq;
    uint64_t max_frame;
    uint64_t id_counter, alt_counter, outboxed;
    uint64_t dropped[PF_NKINDS];
    unsigned rejected, unreported;
    size_t ring_len, ring_sent, part_sent, rlen, rskip, hello_len;
    unsigned char id_seed[16];
    char socket_path[108];
    char job_id[1028];
    char fuzzer[1028];
    char last_id[40];
    char errmsg[256];
    char outbox[512];
    char outbox_daemon[512];
    unsigned char hello[2304];
    unsigned char tmp[1024];
    unsigned char rbuf[PF_RBUF_SIZE];
    unsigned char ring[PF_RING_SIZE];
} pf_client;

int pf_connect(pf_client *c, const char *socket_path, const char *job_id, const char *fuzzer);
int pf_connect_opts(pf_client *c, const pf_options *options);
void pf_set_timeout(pf_client *c, int timeout_ms);
int pf_crash(pf_client *c, const char *type, const void *input, size_t input_len, int signo,
             int exit_code, const char *output, const char *stack_trace);
int pf_coverage(pf_client *c, int64_t edges, int64_t new_edges, int64_t exec_count);
int pf_corpus(pf_client *c, const char *const *files, size_t nfiles, int64_t total_size);
int pf_stats(pf_client *c, const pf_stats_t *stats);
int pf_lifecycle(pf_client *c, const char *kind, const char *message);
int pf_flush(pf_client *c, int timeout_ms);
void pf_close(pf_client *c);
int pf_is_connected(const pf_client *c);
const char *pf_last_error(const pf_client *c);
const char *pf_last_event_id(const pf_client *c);
const char *pf_outbox_dir(const pf_client *c);
uint64_t pf_dropped(const pf_client *c, const char *kind);
uint64_t pf_outboxed(const pf_client *c);
const char *pf_strerror(int code);

#ifdef __cplusplus
}
#endif
#endif /* PFCLIENT_H */

/* ======================================== implementation ======================================== */
#ifdef PFCLIENT_IMPLEMENTATION
#ifndef PFCLIENT_IMPLEMENTED
#define PFCLIENT_IMPLEMENTED

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h> /* rename */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if defined(__GLIBC__) && !defined(__USE_POSIX199309)
#error "pfclient.h: POSIX declarations are off; include pfclient.h before any system header in the PFCLIENT_IMPLEMENTATION file, or compile with -D_DEFAULT_SOURCE"
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* non-Linux: the caller should ignore SIGPIPE */
#endif

/* The environment is read (by pf_connect only) with secure_getenv where the C library has it:
 * a set-uid or file-capability program does not take its socket or outbox from its caller. */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 17)) && \
    (defined(__USE_GNU) || !defined(__cplusplus))
#ifndef __USE_GNU
extern char *secure_getenv(const char *name); /* declared by <stdlib.h> only with _GNU_SOURCE */
#endif
#define pf__getenv(name) secure_getenv(name)
#else
static const char *pf__getenv(const char *name) {
    if (getuid() != geteuid() || getgid() != getegid()) return NULL;
    return getenv(name);
}
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define PF__BROKEN (-100)          /* internal: the connection is unusable */
#define PF__DEFAULT_MAX_FRAME 16777216u
#define PF__INPUT_MAX (10u * 1024u * 1024u)
#define PF__TEXT_MAX 65536u
#define PF__TYPE_MAX 256u
#define PF__NAME_MAX 256u
#define PF__PATH_MAX 4096u
#define PF__FILES_MAX 1024u
#define PF__SEQ_OFFSET 18u         /* of the 8 seq bytes in an event frame, see pf__event_head */
#define PF__BACKOFF_MIN 100
#define PF__BACKOFF_MAX 5000
#define PF__KIND_COVERAGE 1
#define PF__KIND_STATS 3

static const char *const pf__kinds[PF_NKINDS] = {"crash",   "coverage", "corpus", "stats",
                                                 "started", "stopped",  "error",  "timeout"};

/* ---- time, errors ---- */

static int64_t pf__now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t pf__now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double pf__wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void pf__err(pf_client *c, const char *a, const char *b, size_t blen) {
    size_t n = 0, cap = sizeof c->errmsg - 1;
    while (a != NULL && *a && n < cap) c->errmsg[n++] = *a++;
    while (b != NULL && blen-- > 0 && n < cap) c->errmsg[n++] = *b++;
    c->errmsg[n] = '\0';
}

static void pf__err_append(pf_client *c, const char *s, size_t len) {
    size_t n = strlen(c->errmsg), cap = sizeof c->errmsg - 1;
    while (len-- > 0 && n < cap) c->errmsg[n++] = *s++;
    c->errmsg[n] = '\0';
}

static void pf__err_num(pf_client *c, uint64_t v) {
    char digits[24];
    size_t n = 0;
    do {
        digits[sizeof digits - 1 - n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0 && n < sizeof digits);
    pf__err_append(c, digits + sizeof digits - n, n);
}

static const char *pf__errno_text(int e) {
    switch (e) {
    case ENOENT: return "no such file (daemon not running?)";
    case ECONNREFUSED: return "connection refused (daemon not running?)";
    case EACCES: return "permission denied";
    case EAGAIN: return "daemon backlog full";
    case ENOTSOCK: return "not a socket";
    case EMFILE: case ENFILE: return "too many open files";
    case ENOSPC: return "no space left on device";
    case EROFS: return "read-only file system";
    case ENOTDIR: return "a component is not a directory";
    case ELOOP: return "a symbolic link (refused)";
    case EEXIST: return "file exists";
    case EIO: return "input/output error";
    case EDQUOT: return "disk quota exceeded";
    default: return "system call failed";
    }
}

/* ---- UTF-8 ---- */

/* Length of the valid UTF-8 sequence at s (as Python's strict decoder sees it), 0 if invalid. */
static size_t pf__utf8_seq(const unsigned char *s, size_t n) {
    unsigned char b = s[0], lo = 0x80, hi = 0xBF;
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) return (n >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
    if (b >= 0xE0 && b <= 0xEF) {
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F; /* no surrogates */
        if (n < 3 || s[1] < lo || s[1] > hi || (s[2] & 0xC0) != 0x80) return 0;
        return 3;
    }
    if (b >= 0xF0 && b <= 0xF4) {
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F;
        if (n < 4 || s[1] < lo || s[1] > hi || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        return 4;
    }
    return 0;
}

/* Longest prefix of s[0..n) of at most max bytes that does not split a UTF-8 sequence. */
static size_t pf__utf8_cut(const char *s, size_t n, size_t max) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, k;
    if (n <= max) return n;
    while (i < max) {
        k = pf__utf8_seq(u + i, n - i);
        if (k == 0) k = 1;
        if (i + k > max) break;
        i += k;
    }
    return i;
}

/* Characters in s[0..n) once invalid bytes are replaced (one character each). */
static size_t pf__utf8_chars(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, chars = 0, k;
    while (i < n) {
        k = pf__utf8_seq(u + i, n - i);
        i += k ? k : 1;
        chars++;
    }
    return chars;
}

/* Copy with every invalid byte replaced by '?': the length stays n. */
static void pf__utf8_copy(unsigned char *dst, const char *src, size_t n) {
    const unsigned char *u = (const unsigned char *)src;
    size_t i = 0, k;
    while (i < n) {
        k = pf__utf8_seq(u + i, n - i);
        if (k == 0) {
            dst[i++] = '?';
        } else {
            memcpy(dst + i, u + i, k);
            i += k;
        }
    }
}

/* A job id / fuzzer name: 1..256 chars of strict UTF-8, no C0, DEL or C1 control characters. */
static int pf__valid_name(const char *s) {
    const unsigned char *u = (const unsigned char *)s;
    size_t n, i = 0, chars = 0, k;
    if (s == NULL) return 0;
    n = strlen(s);
    while (i < n) {
        k = pf__utf8_seq(u + i, n - i);
        if (k == 0 || u[i] < 0x20 || u[i] == 0x7F || (u[i] == 0xC2 && u[i + 1] < 0xA0)) return 0;
        i += k;
        chars++;
    }
    return chars >= 1 && chars <= PF__NAME_MAX;
}

/* ---- msgpack writer (into a fixed buffer; overflow is sticky) ---- */

typedef struct pf__w {
    unsigned char *p;
    size_t n, cap;
    int oflow;
} pf__w;

static void pf__w_init(pf__w *w, unsigned char *p, size_t cap) {
    w->p = p;
    w->n = 0;
    w->cap = cap;
    w->oflow = 0;
}

static unsigned char *pf__w_room(pf__w *w, size_t len) {
    unsigned char *at;
    if (w->oflow || w->cap - w->n < len) {
        w->oflow = 1;
        return NULL;
    }
    at = w->p + w->n;
    w->n += len;
    return at;
}

static void pf__w_be(pf__w *w, unsigned tag, uint64_t v, unsigned bytes) {
    unsigned char *at = pf__w_room(w, 1 + bytes);
    unsigned i;
    if (at == NULL) return;
    at[0] = (unsigned char)tag;
    for (i = 0; i < bytes; i++) at[1 + i] = (unsigned char)(v >> (8 * (bytes - 1 - i)));
}

static void pf__w_raw(pf__w *w, const void *src, size_t len) {
    unsigned char *at = pf__w_room(w, len);
    if (at != NULL && len) memcpy(at, src, len);
}

static void pf__w_str_hdr(pf__w *w, size_t len) {
    if (len < 32) pf__w_be(w, 0xA0u | (unsigned)len, 0, 0);
    else if (len < 0x100) pf__w_be(w, 0xD9, len, 1);
    else if (len < 0x10000) pf__w_be(w, 0xDA, len, 2);
    else pf__w_be(w, 0xDB, len, 4);
}

static void pf__w_bin_hdr(pf__w *w, size_t len) {
    if (len < 0x100) pf__w_be(w, 0xC4, len, 1);
    else if (len < 0x10000) pf__w_be(w, 0xC5, len, 2);
    else pf__w_be(w, 0xC6, len, 4);
}

/* A string literal of this file (known valid UTF-8). */
static void pf__w_key(pf__w *w, const char *s) {
    size_t len = strlen(s);
    pf__w_str_hdr(w, len);
    pf__w_raw(w, s, len);
}

/* A caller's string: cut to max bytes at a UTF-8 boundary, invalid bytes replaced. */
static void pf__w_text(pf__w *w, const char *s, size_t max) {
    size_t len = (s == NULL) ? 0 : pf__utf8_cut(s, strlen(s), max);
    unsigned char *at;
    pf__w_str_hdr(w, len);
    at = pf__w_room(w, len);
    if (at != NULL && len) pf__utf8_copy(at, s, len);
}

static void pf__w_int(pf__w *w, int64_t v) {
    if (v >= 0) {
        uint64_t u = (uint64_t)v;
        if (u < 0x80) pf__w_be(w, (unsigned)u, 0, 0);
        else if (u <= 0xFF) pf__w_be(w, 0xCC, u, 1);
        else if (u <= 0xFFFF) pf__w_be(w, 0xCD, u, 2);
        else if (u <= 0xFFFFFFFFu) pf__w_be(w, 0xCE, u, 4);
        else pf__w_be(w, 0xCF, u, 8);
    } else if (v >= -32) {
        pf__w_be(w, (unsigned)(v & 0xFF), 0, 0);
    } else if (v >= -128) {
        pf__w_be(w, 0xD0, (uint64_t)v & 0xFFu, 1);
    } else if (v >= -32768) {
        pf__w_be(w, 0xD1, (uint64_t)v & 0xFFFFu, 2);
    } else if (v >= -2147483647 - 1) {
        pf__w_be(w, 0xD2, (uint64_t)v & 0xFFFFFFFFu, 4);
    } else {
        pf__w_be(w, 0xD3, (uint64_t)v, 8);
    }
}

static void pf__w_f64(pf__w *w, double d) {
    uint64_t bits;
    if (d != d || d > 1.7976931348623157e308 || d < -1.7976931348623157e308) d = 0.0; /* finite */
    memcpy(&bits, &d, sizeof bits);
    pf__w_be(w, 0xCB, bits, 8);
}

static void pf__w_kint(pf__w *w, const char *key, int64_t v) {
    pf__w_key(w, key);
    pf__w_int(w, v);
}

static void pf__w_kf64(pf__w *w, const char *key, double v) {
    pf__w_key(w, key);
    pf__w_f64(w, v);
}

static void pf__put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static void pf__put_be64(unsigned char *p, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (56 - 8 * i));
}

static uint32_t pf__get_be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* ---- event ids ---- */

static void pf__seed(pf_client *c) {
    size_t got = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        while (got < sizeof c->id_seed) {
            ssize_t r = read(fd, c->id_seed + got, sizeof c->id_seed - got);
            if (r > 0) got += (size_t)r;
            else if (r < 0 && errno == EINTR) continue;
            else break;
        }
        close(fd);
    }
    if (got < sizeof c->id_seed) { /* no /dev/urandom: time, pid and address, mixed */
        uint64_t x = (uint64_t)pf__now_ms() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)c;
        size_t i;
        x ^= (uint64_t)(pf__wall() * 1e6);
        for (i = 0; i < sizeof c->id_seed; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c->id_seed[i] = (unsigned char)(x >> 24);
        }
    }
    c->id_counter = 0;
}

/* A UUID-formatted id: the seed with (its low 48 bits + count) and the version-4 bits; alt
 * flips one bit of byte 9, a series of its own (for crashes written from a re-entered call). */
static void pf__make_id(const unsigned char seed[16], uint64_t count, int alt, char *out) {
    static const char hex[] = "0123456789abcdef";
    unsigned char b[16];
    uint64_t low = 0;
    size_t i, n = 0;
    memcpy(b, seed, sizeof b);
    for (i = 10; i < 16; i++) low = (low << 8) | b[i];
    low += count;
    for (i = 15; i >= 10; i--) {
        b[i] = (unsigned char)low;
        low >>= 8;
    }
    b[6] = (unsigned char)((b[6] & 0x0F) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3F) | 0x80);
    if (alt) b[9] ^= 0x01;
    for (i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) out[n++] = '-';
        out[n++] = hex[b[i] >> 4];
        out[n++] = hex[b[i] & 15];
    }
    out[n] = '\0';
}

/* The envelope every event frame starts with; seq is always 8 bytes at PF__SEQ_OFFSET so a
 * kept frame can be renumbered in place when it is resent on a new connection. id NULL: a
 * new id (then in c->last_id). */
static void pf__event_head(pf_client *c, pf__w *w, unsigned nkeys, const char *kind,
                           const char *id) {
    if (id == NULL) {
        pf__make_id(c->id_seed, ++c->id_counter, 0, c->last_id);
        id = c->last_id;
    }
    pf__w_room(w, 4); /* length prefix, filled in by pf__w_finish */
    pf__w_be(w, 0x80u | (5u + nkeys), 0, 0);
    pf__w_key(w, "t");
    pf__w_key(w, "event");
    pf__w_key(w, "seq");
    pf__w_be(w, 0xCF, 0, 8);
    pf__w_key(w, "kind");
    pf__w_key(w, kind);
    pf__w_key(w, "id");
    pf__w_key(w, id);
    pf__w_kf64(w, "ts", pf__wall());
}

/* The hello frame of this process, kept whole: sent on every connection, first frame of
 * every outbox file. */
static void pf__build_hello(pf_client *c) {
    pf__w w;
    pf__w_init(&w, c->hello, sizeof c->hello);
    pf__w_room(&w, 4);
    pf__w_be(&w, 0x85, 0, 0);
    pf__w_key(&w, "t");
    pf__w_key(&w, "hello");
    pf__w_kint(&w, "v", 1);
    pf__w_key(&w, "job_id");
    pf__w_key(&w, c->job_id);
    pf__w_key(&w, "fuzzer");
    pf__w_key(&w, c->fuzzer);
    pf__w_kint(&w, "pid", (int64_t)getpid());
    pf__put_be32(w.p, (uint32_t)(w.n - 4));
    c->hello_len = w.n; /* fits: 2 names of at most 1024 bytes */
}

static void pf__w_finish(pf__w *w, size_t extra) {
    if (!w->oflow) pf__put_be32(w->p, (uint32_t)(w->n - 4 + extra));
}

/* ---- msgpack reader (daemon messages) ---- */

typedef struct pf__r {
    const unsigned char *p;
    size_t n, i;
} pf__r;

typedef struct pf__val {
    int type; /* 0 nil, 1 bool, 2 int, 3 str, 4 anything else */
    int64_t i;
    const char *s;
    size_t len;
} pf__val;

static int pf__r_take(pf__r *r, size_t k, const unsigned char **out) {
    if (r->n - r->i < k) return -1;
    *out = r->p + r->i;
    r->i += k;
    return 0;
}

static int pf__r_uint(pf__r *r, unsigned bytes, uint64_t *v) {
    const unsigned char *p;
    unsigned k;
    if (pf__r_take(r, bytes, &p)) return -1;
    *v = 0;
    for (k = 0; k < bytes; k++) *v = (*v << 8) | p[k];
    return 0;
}

/* Reads one object into v (containers and other types are skipped, type 4). */
static int pf__r_obj(pf__r *r, pf__val *v, int depth) {
    const unsigned char *p;
    uint64_t len = 0, count = 0, k;
    unsigned b;
    int is_map = 0;
    pf__val skip;
    if (depth > 32 || pf__r_take(r, 1, &p)) return -1;
    b = p[0];
    v->type = 4;
    v->i = 0;
    v->s = NULL;
    v->len = 0;
    if (b <= 0x7F) { v->type = 2; v->i = b; return 0; }
    if (b >= 0xE0) { v->type = 2; v->i = (int64_t)b - 256; return 0; }
    if (b >= 0xA0 && b <= 0xBF) { len = b & 0x1F; goto str; }
    if (b >= 0x80 && b <= 0x8F) { count = b & 0x0F; is_map = 1; goto container; }
    if (b >= 0x90 && b <= 0x9F) { count = b & 0x0F; goto container; }
    switch (b) {
    case 0xC0: v->type = 0; return 0;
    case 0xC2: case 0xC3: v->type = 1; v->i = b == 0xC3; return 0;
    case 0xC4: case 0xC5: case 0xC6:
        if (pf__r_uint(r, 1u << (b - 0xC4), &len)) return -1;
        return pf__r_take(r, (size_t)len, &p);
    case 0xC7: case 0xC8: case 0xC9:
        if (pf__r_uint(r, 1u << (b - 0xC7), &len)) return -1;
        return pf__r_take(r, (size_t)len + 1, &p);
    case 0xCA: return pf__r_take(r, 4, &p);
    case 0xCB: return pf__r_take(r, 8, &p);
    case 0xCC: case 0xCD: case 0xCE: case 0xCF:
        if (pf__r_uint(r, 1u << (b - 0xCC), &len)) return -1;
        v->type = 2;
        v->i = len > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)len;
        return 0;
    case 0xD0: case 0xD1: case 0xD2: case 0xD3: {
        unsigned bytes = 1u << (b - 0xD0);
        if (pf__r_uint(r, bytes, &len)) return -1;
        if (bytes < 8 && (len >> (8 * bytes - 1)) & 1) len |= ~(uint64_t)0 << (8 * bytes);
        v->type = 2;
        v->i = (int64_t)len; /* two's complement */
        return 0;
    }
    case 0xD4: case 0xD5: case 0xD6: case 0xD7: case 0xD8:
        return pf__r_take(r, ((size_t)1 << (b - 0xD4)) + 1, &p);
    case 0xD9: case 0xDA: case 0xDB:
        if (pf__r_uint(r, 1u << (b - 0xD9), &len)) return -1;
        goto str;
    case 0xDC: case 0xDD:
        if (pf__r_uint(r, 2u << (b - 0xDC), &count)) return -1;
        goto container;
    case 0xDE: case 0xDF:
        if (pf__r_uint(r, 2u << (b - 0xDE), &count)) return -1;
        is_map = 1;
        goto container;
    default: return -1; /* 0xC1 */
    }
str:
    if (pf__r_take(r, (size_t)len, &p)) return -1;
    v->type = 3;
    v->s = (const char *)p;
    v->len = (size_t)len;
    return 0;
container:
    if (is_map) count *= 2;
    for (k = 0; k < count; k++)
        if (pf__r_obj(r, &skip, depth + 1)) return -1;
    return 0;
}

static int pf__str_is(const pf__val *v, const char *s) {
    return v->type == 3 && v->len == strlen(s) && memcmp(v->s, s, v->len) == 0;
}

/* One message from the daemon. Returns 0, or PF_EPROTO for a frame that is not a message map. */
static int pf__handle(pf_client *c, const unsigned char *body, size_t len) {
    pf__r r;
    pf__val key, val, t, code, msg, outbox;
    const unsigned char *p;
    uint64_t count = 0, k;
    int64_t seq = -1, max_frame = -1;
    int fatal = 0;
    r.p = body;
    r.n = len;
    r.i = 0;
    memset(&t, 0, sizeof t);
    memset(&code, 0, sizeof code);
    memset(&msg, 0, sizeof msg);
    memset(&outbox, 0, sizeof outbox);
    if (pf__r_take(&r, 1, &p)) return PF_EPROTO;
    if (p[0] >= 0x80 && p[0] <= 0x8F) count = p[0] & 0x0F;
    else if (p[0] == 0xDE && pf__r_uint(&r, 2, &count) == 0) { /* map16 */ }
    else if (p[0] == 0xDF && pf__r_uint(&r, 4, &count) == 0) { /* map32 */ }
    else return PF_EPROTO;
    for (k = 0; k < count; k++) {
        if (pf__r_obj(&r, &key, 1) || pf__r_obj(&r, &val, 1)) return PF_EPROTO;
        if (pf__str_is(&key, "t")) t = val;
        else if (pf__str_is(&key, "seq") && val.type == 2) seq = val.i;
        else if (pf__str_is(&key, "max_frame") && val.type == 2) max_frame = val.i;
        else if (pf__str_is(&key, "code")) code = val;
        else if (pf__str_is(&key, "message")) msg = val;
        else if (pf__str_is(&key, "outbox")) outbox = val;
        else if (pf__str_is(&key, "fatal") && val.type == 1) fatal = (int)val.i;
    }
    if (r.i != r.n || t.type != 3) return PF_EPROTO;
    if (pf__str_is(&t, "ack")) {
        if (seq > 0 && (uint64_t)seq > c->acked) c->acked = (uint64_t)seq;
        if (seq > 0) c->backoff_ms = 0; /* a connection that works */
    } else if (pf__str_is(&t, "welcome")) {
        c->welcomed = 1;
        if (max_frame > 0) c->max_frame = (uint64_t)max_frame;
        if (outbox.type == 3 && outbox.len > 1 && outbox.len < sizeof c->outbox_daemon &&
            outbox.s[0] == '/' && memchr(outbox.s, 0, outbox.len) == NULL &&
            !(c->outbox_learned && strlen(c->outbox_daemon) == outbox.len &&
              memcmp(c->outbox_daemon, outbox.s, outbox.len) == 0)) {
            c->outbox_learned = 0; /* a signal handler reading it meanwhile uses c->outbox */
            memcpy(c->outbox_daemon, outbox.s, outbox.len);
            c->outbox_daemon[outbox.len] = '\0';
            c->outbox_learned = 1;
        }
    } else if (pf__str_is(&t, "error")) {
        if (!c->welcomed || fatal) c->refused = 1;
        if (seq > 0 && (uint64_t)seq == c->crash_seq) {
            c->crash_rejected = 1;
            c->crash_retry = pf__str_is(&code, "spool_full") || pf__str_is(&code, "disk_full") ||
                             pf__str_is(&code, "spool_write_failed"); /* "not now" */
        } else if (c->welcomed) {
            c->unreported++;
        }
        c->rejected++;
        pf__err(c, "daemon error ", code.type == 3 ? code.s : "?", code.type == 3 ? code.len : 1);
        if (seq > 0) {
            pf__err_append(c, " (seq ", 6);
            pf__err_num(c, (uint64_t)seq);
            pf__err_append(c, ")", 1);
        }
        if (msg.type == 3) {
            pf__err_append(c, ": ", 2);
            pf__err_append(c, msg.s, msg.len);
        }
    }
    return 0; /* "reply" and unknown message types are ignored */
}

/* ---- socket I/O ---- */

static void pf__drop(pf_client *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->welcomed = 0;
    c->ring_sent = c->part_sent = 0; /* everything kept is resent on the next connection */
    c->rlen = c->rskip = 0;
}

/* poll() on the client's socket until deadline: revents, 0 on timeout, -1 on error. */
static int pf__poll(pf_client *c, short events, int64_t deadline) {
    for (;;) {
        struct pollfd pfd;
        int64_t rem = deadline - pf__now_ms();
        int r;
        pfd.fd = c->fd;
        pfd.events = events;
        pfd.revents = 0;
        r = poll(&pfd, 1, rem < 0 ? 0 : (int)rem);
        if (r > 0) return pfd.revents;
        if (r == 0) return 0;
        if (errno != EINTR) return -1;
    }
}

/* Reads and handles every message already waiting, without blocking. */
static int pf__drain(pf_client *c) {
    for (;;) {
        ssize_t got;
        size_t off = 0;
        if (c->fd < 0) return PF__BROKEN;
        got = recv(c->fd, c->rbuf + c->rlen, sizeof c->rbuf - c->rlen, MSG_DONTWAIT);
        if (got < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return PF__BROKEN;
        }
        if (got == 0) return PF__BROKEN; /* EOF */
        c->rlen += (size_t)got;
        for (;;) {
            size_t avail = c->rlen - off;
            uint32_t flen;
            if (c->rskip) { /* the rest of a frame too large for rbuf: not ours to read */
                size_t k = c->rskip < avail ? c->rskip : avail;
                c->rskip -= k;
                off += k;
                if (c->rskip) break;
                continue;
            }
            if (avail < 4) break;
            flen = pf__get_be32(c->rbuf + off);
            if (flen == 0 || flen > (1u << 24)) {
                pf__err(c, "daemon sent a malformed frame", NULL, 0);
                return PF__BROKEN;
            }
            if (flen > sizeof c->rbuf - 4) {
                c->rskip = flen;
                off += 4;
                continue;
            }
            if (avail < 4 + (size_t)flen) break;
            if (pf__handle(c, c->rbuf + off + 4, flen) != 0) {
                pf__err(c, "daemon sent a frame that is not a message map", NULL, 0);
                return PF__BROKEN;
            }
            off += 4 + (size_t)flen;
        }
        if (off) {
            memmove(c->rbuf, c->rbuf + off, c->rlen - off);
            c->rlen -= off;
        }
    }
}

/* Writes all of p, reading the daemon's messages whenever the socket is full. */
static int pf__send_all(pf_client *c, const void *data, size_t n, int64_t deadline) {
    const unsigned char *p = (const unsigned char *)data;
    while (n > 0) {
        ssize_t r;
        if (c->fd < 0) return PF__BROKEN;
        r = send(c->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int ev = pf__poll(c, POLLIN | POLLOUT, deadline);
            if (ev < 0) return PF__BROKEN;
            if (ev == 0) return PF_ETIMEDOUT; /* a frame cut in half: the caller drops us */
            if (ev & (POLLIN | POLLHUP | POLLERR)) {
                int rc = pf__drain(c);
                if (rc) return rc;
            }
        } else {
            return PF__BROKEN; /* EPIPE, ECONNRESET, ... */
        }
    }
    return 0;
}

/* write() all of p to a file: 0, or -1 with errno set. */
static int pf__write_all(int fd, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    while (n > 0) {
        ssize_t r = write(fd, p, n);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else {
            if (r == 0) errno = EIO;
            return -1;
        }
    }
    return 0;
}

/* Bytes to the socket (file_fd < 0) or to a file (file_fd >= 0, -1 on error). */
static int pf__emit(pf_client *c, int file_fd, const void *p, size_t n, int64_t deadline) {
    if (file_fd >= 0) return pf__write_all(file_fd, p, n);
    return pf__send_all(c, p, n, deadline);
}

/* Emits s[0..n) as msgpack str bytes, replacing invalid UTF-8, through a small stack chunk. */
static int pf__emit_text(pf_client *c, int file_fd, const char *s, size_t n, int64_t deadline) {
    unsigned char chunk[512];
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, used = 0, k;
    int rc;
    while (i < n) {
        k = pf__utf8_seq(u + i, n - i);
        if (used + 4 > sizeof chunk) {
            if ((rc = pf__emit(c, file_fd, chunk, used, deadline)) != 0) return rc;
            used = 0;
        }
        if (k == 0) {
            chunk[used++] = '?';
            i++;
        } else {
            memcpy(chunk + used, u + i, k);
            used += k;
            i += k;
        }
    }
    return used ? pf__emit(c, file_fd, chunk, used, deadline) : 0;
}

/* ---- the ring of unacknowledged events ----
 * ring[0 .. ring_sent) went out whole on this connection (each frame carries its seq);
 * part_sent bytes of the frame at ring_sent went out too; the rest is waiting. */

static size_t pf__frame_len(const unsigned char *f) { return 4 + (size_t)pf__get_be32(f); }

static uint64_t pf__frame_seq(const unsigned char *f) {
    uint64_t v = 0;
    int i;
    for (i = 0; i < 8; i++) v = (v << 8) | f[PF__SEQ_OFFSET + i];
    return v;
}

/* Index of the frame's kind in pf__kinds (its "kind" value follows the 8 seq bytes). */
static int pf__frame_kind(const unsigned char *f) {
    const unsigned char *k = f + PF__SEQ_OFFSET + 8 + 5;
    size_t len = k[0] & 0x1Fu;
    int i;
    for (i = 0; i < PF_NKINDS; i++)
        if (strlen(pf__kinds[i]) == len && memcmp(pf__kinds[i], k + 1, len) == 0) return i;
    return PF_NKINDS - 1;
}

/* Forgets the acknowledged prefix of what was sent on this connection. */
static void pf__ring_gc(pf_client *c) {
    size_t off = 0;
    if (c->fd < 0 || !c->welcomed) return;
    while (off < c->ring_sent && pf__frame_seq(c->ring + off) <= c->acked)
        off += pf__frame_len(c->ring + off);
    if (off) {
        memmove(c->ring, c->ring + off, c->ring_len - off);
        c->ring_len -= off;
        c->ring_sent -= off;
    }
}

/* Drops the oldest kept frame, stats and coverage first, never the one half sent; counts it.
 * Returns 0 when there was nothing to drop. */
static int pf__evict(pf_client *c) {
    size_t off, len, victim = (size_t)-1;
    int pass, kind;
    for (pass = 0; pass < 2 && victim == (size_t)-1; pass++) {
        for (off = 0; off < c->ring_len; off += pf__frame_len(c->ring + off)) {
            if (off == c->ring_sent && c->part_sent) continue;
            kind = pf__frame_kind(c->ring + off);
            if (pass == 1 || kind == PF__KIND_STATS || kind == PF__KIND_COVERAGE) {
                victim = off;
                break;
            }
        }
    }
    if (victim == (size_t)-1) return 0;
    len = pf__frame_len(c->ring + victim);
    c->dropped[pf__frame_kind(c->ring + victim)]++;
    memmove(c->ring + victim, c->ring + victim + len, c->ring_len - victim - len);
    c->ring_len -= len;
    if (victim < c->ring_sent) c->ring_sent -= len;
    return 1;
}

/* Sends what is waiting in the ring, numbering each frame as it starts. wait = 0: stops at the
 * first full socket buffer (the rest goes later); wait = 1: until deadline. */
static int pf__pump(pf_client *c, int64_t deadline, int wait) {
    while (c->ring_sent < c->ring_len) {
        unsigned char *f = c->ring + c->ring_sent;
        size_t flen = pf__frame_len(f);
        ssize_t r;
        if (c->fd < 0) return PF__BROKEN;
        if (c->part_sent == 0) pf__put_be64(f + PF__SEQ_OFFSET, c->seq + 1); /* tentative */
        r = send(c->fd, f + c->part_sent, flen - c->part_sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            if (c->part_sent == 0) c->seq++;
            c->part_sent += (size_t)r;
            if (c->part_sent == flen) {
                c->ring_sent += flen;
                c->part_sent = 0;
            }
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int ev;
            if (!wait) return 0;
            ev = pf__poll(c, POLLIN | POLLOUT, deadline);
            if (ev < 0) return PF__BROKEN;
            if (ev == 0) return PF_ETIMEDOUT;
            if ((ev & (POLLIN | POLLHUP | POLLERR)) && pf__drain(c) != 0) return PF__BROKEN;
        } else {
            return PF__BROKEN;
        }
    }
    return 0;
}

static int pf__leave(pf_client *c, int rc, int saved_errno) {
    c->busy = 0;
    errno = saved_errno;
    return rc;
}

/* ---- connecting ---- */

static void pf__fail(pf_client *c) {
    pf__drop(c);
    c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : PF__BACKOFF_MIN;
    if (c->backoff_ms > PF__BACKOFF_MAX) c->backoff_ms = PF__BACKOFF_MAX;
    c->retry_at_ms = pf__now_ms() + c->backoff_ms;
}

/* The kernel's word on who listens at the other end: 0 and *uid, or -1 when unknown. */
#if defined(__linux__)
#if defined(SO_PEERCRED)
#define PF__SO_PEERCRED SO_PEERCRED
#elif defined(__powerpc__) || defined(__powerpc64__) /* <sys/socket.h> has it only with */
#define PF__SO_PEERCRED 21                             /* _DEFAULT_SOURCE: the kernel's value */
#elif defined(__mips__) || defined(__alpha__)
#define PF__SO_PEERCRED 18
#elif defined(__sparc__)
#define PF__SO_PEERCRED 0x40
#elif defined(__hppa__)
#define PF__SO_PEERCRED 0x4011
#else
#define PF__SO_PEERCRED 17
#endif
struct pf__ucred { /* struct ucred without _GNU_SOURCE: pid_t, uid_t, gid_t (32 bits each) */
    int32_t pid;
    uint32_t uid, gid;
};
static int pf__peer_uid(int fd, unsigned long *uid) {
    struct pf__ucred cr;
    socklen_t len = (socklen_t)sizeof cr;
    if (getsockopt(fd, SOL_SOCKET, PF__SO_PEERCRED, &cr, &len) != 0 || len < (socklen_t)sizeof cr)
        return -1;
    *uid = cr.uid;
    return 0;
}
#elif defined(__APPLE__) || defined(__FreeBSD__) || defined(__OpenBSD__) || \
    defined(__NetBSD__) || defined(__DragonFly__)
int getpeereid(int, uid_t *, gid_t *);
static int pf__peer_uid(int fd, unsigned long *uid) {
    uid_t u;
    gid_t g;
    if (getpeereid(fd, &u, &g) != 0) return -1;
    *uid = (unsigned long)u;
    return 0;
}
#else
#define PF__NO_PEER_CHECK 1
static int pf__peer_uid(int fd, unsigned long *uid) {
    (void)fd;
    (void)uid;
    return -1;
}
#endif

/* One line on stderr (write(2): async-signal-safe). */
static void pf__log(const char *a, const char *b) {
    (void)!write(2, "pfclient: ", 10);
    (void)!write(2, a, strlen(a));
    if (b != NULL) (void)!write(2, b, strlen(b));
    (void)!write(2, "\n", 1);
}

/* Refuses a daemon that runs as another uid than ours, root's, or the one we were told. */
static int pf__check_peer(pf_client *c, int fd) {
    unsigned long uid = 0;
    if (pf__peer_uid(fd, &uid) != 0) {
#ifdef PF__NO_PEER_CHECK
        return 0; /* no peer credentials on this platform: documented */
#else
        pf__err(c, "cannot read the credentials of the daemon at ", c->socket_path,
                strlen(c->socket_path));
        return PF_EUNTRUSTED;
#endif
    }
    int i;
    if (uid == 0 || uid == (unsigned long)geteuid() || uid == (unsigned long)getuid()) return 0;
    for (i = 0; i < c->ntrust; i++)
        if (uid == c->trust_uids[i]) return 0;
    pf__err(c, "refusing the daemon at ", c->socket_path, strlen(c->socket_path));
    pf__err_append(c, ": it runs as uid ", 17);
    pf__err_num(c, uid);
    pf__err_append(c, ", which is not this process's uid (", 35);
    pf__err_num(c, (uint64_t)getuid());
    pf__err_append(c, "), root, or a uid trusted through PFCOLLECTOR_DAEMON_UID / daemon_uid", 69);
    if (!c->strict && !c->refusal_logged) {
        c->refusal_logged = 1;
        pf__log(c->errmsg, NULL);
    }
    return PF_EUNTRUSTED;
}

/* Connect, check the peer, send the hello. The welcome is awaited by pf__ensure. */
static int pf__start(pf_client *c) {
    struct sockaddr_un addr;
    size_t plen = strlen(c->socket_path);
    int fd, rc;

    pf__drop(c);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) {
        pf__err(c, "socket() failed: ", pf__errno_text(errno), strlen(pf__errno_text(errno)));
        pf__fail(c);
        return PF_ENOTCONN;
    }
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, c->socket_path, plen + 1);
    if (connect(fd, (struct sockaddr *)&addr, (socklen_t)sizeof addr) != 0) {
        int e = errno;
        close(fd);
        pf__err(c, "cannot reach the pfcollector daemon at ", c->socket_path, plen);
        pf__err_append(c, ": ", 2);
        pf__err_append(c, pf__errno_text(e), strlen(pf__errno_text(e)));
        pf__fail(c);
        return PF_ENOTCONN;
    }
    if ((rc = pf__check_peer(c, fd)) != 0) {
        close(fd); /* not a byte was sent to it */
        pf__fail(c);
        return rc;
    }
    c->fd = fd;
    c->seq = c->acked = c->crash_seq = 0;
    c->welcomed = c->refused = 0;
    c->max_frame = PF__DEFAULT_MAX_FRAME;
    c->hs_deadline_ms = pf__now_ms() + c->timeout_ms;
    rc = pf__send_all(c, c->hello, c->hello_len, c->hs_deadline_ms);
    if (rc != 0) {
        pf__err(c, "the daemon closed the connection during hello", NULL, 0);
        pf__fail(c);
        return PF_ENOTCONN;
    }
    return 0;
}

/* Makes sure there is a welcomed connection: starts one when the backoff allows, then waits
 * for the welcome until deadline if wait (or if this call started the connection). Returns 0
 * when ready, else a negative code (the handshake may still be under way). */
static int pf__ensure(pf_client *c, int64_t deadline, int wait) {
    int rc, ev;
    if (c->fd < 0) {
        if (pf__now_ms() < c->retry_at_ms) {
            if (!c->errmsg[0]) pf__err(c, "the pfcollector daemon is not reachable", NULL, 0);
            return c->last_rc ? c->last_rc : PF_ENOTCONN;
        }
        if ((rc = pf__start(c)) != 0) return c->last_rc = rc;
        wait = 1;
    }
    while (!c->welcomed) {
        rc = pf__drain(c);
        if (c->refused) {
            pf__fail(c);
            return c->last_rc = PF_EPROTO; /* errmsg holds the daemon's error */
        }
        if (c->welcomed) break;
        if (rc != 0) {
            pf__err(c, "the daemon closed the connection during hello", NULL, 0);
            pf__fail(c);
            return c->last_rc = PF_ENOTCONN;
        }
        if (pf__now_ms() >= c->hs_deadline_ms) {
            pf__err(c, "no welcome from the daemon in time", NULL, 0);
            pf__fail(c);
            return c->last_rc = PF_ETIMEDOUT;
        }
        if (!wait) {
            pf__err(c, "waiting for the daemon's welcome", NULL, 0);
            return PF_ENOTCONN;
        }
        ev = pf__poll(c, POLLIN, deadline < c->hs_deadline_ms ? deadline : c->hs_deadline_ms);
        if (ev < 0) {
            pf__fail(c);
            return c->last_rc = PF_ENOTCONN;
        }
        if (ev == 0 && pf__now_ms() >= deadline && deadline < c->hs_deadline_ms) {
            pf__err(c, "waiting for the daemon's welcome", NULL, 0);
            return PF_ETIMEDOUT;
        }
    }
    c->ring_sent = c->part_sent = 0; /* resend every kept event: same id, fresh seq */
    c->hung = 0;
    c->retry_at_ms = 0; /* the backoff is reset by the first ack, not by a welcome */
    c->last_rc = 0;
    c->errmsg[0] = '\0';
    return 0;
}

/* The connection broke inside a call: keep what is unacknowledged, try once more now, unless
 * it broke before a single ack (a daemon that drops us after its welcome): then back off. */
static int pf__lost(pf_client *c, int64_t deadline, int wait) {
    pf__ring_gc(c);
    if (c->backoff_ms) {
        pf__fail(c);
        if (!c->errmsg[0]) pf__err(c, "the daemon closed the connection", NULL, 0);
        return c->last_rc = PF_ENOTCONN;
    }
    pf__drop(c);
    c->backoff_ms = PF__BACKOFF_MIN; /* until an ack proves the new connection */
    c->retry_at_ms = 0;
    return pf__ensure(c, deadline, wait);
}

/* Fork detection, at the start of every call. */
static void pf__check_fork(pf_client *c) {
    long pid = (long)getpid();
    if (pid != c->pid) { /* forked: the socket and the kept events are the parent's */
        if (c->fd >= 0) close(c->fd);
        c->fd = -1;
        c->welcomed = 0;
        c->ring_len = c->ring_sent = c->part_sent = 0;
        c->rlen = c->rskip = 0;
        c->pid = pid;
        c->backoff_ms = 0;
        if (c->retry_at_ms != INT64_MAX) c->retry_at_ms = 0;
        pf__seed(c);
        pf__build_hello(c);
    }
}

#define PF__ENTER(c, saved)                                                                       \
    do {                                                                                          \
        if ((c)->busy) {                                                                          \
            errno = (saved);                                                                      \
            return PF_EBUSY;                                                                      \
        }                                                                                         \
        (c)->busy = 1;                                                                            \
        pf__check_fork(c);                                                                        \
    } while (0)

/* Queue-and-send of a non-waiting event whose frame the builder writes into the ring tail. */
typedef void (*pf__builder)(pf_client *c, pf__w *w, const void *arg);

static int pf__kind_index(const char *kind) {
    int i;
    for (i = 0; i < PF_NKINDS - 1; i++)
        if (strcmp(pf__kinds[i], kind) == 0) return i;
    return PF_NKINDS - 1;
}

static int pf__submit(pf_client *c, pf__builder build, const void *arg, const char *kind) {
    int64_t deadline = pf__now_ms() + (c->strict ? c->timeout_ms : c->budget_ms);
    int rc, ready;
    size_t off;
    pf__w w;
    if (c->retry_at_ms == INT64_MAX) { /* closed, or never initialised */
        if (!c->errmsg[0]) pf__err(c, "the client is closed", NULL, 0);
        return PF_ENOTCONN;
    }
    rc = pf__ensure(c, deadline, c->strict);
    ready = rc == 0;
    if (ready && (pf__drain(c) != 0 || pf__pump(c, deadline, 0) != 0)) {
        rc = pf__lost(c, deadline, c->strict);
        ready = rc == 0;
    }
    if (!ready && c->strict) return rc; /* fail closed: the event is not kept */
    pf__ring_gc(c);
    for (;;) {
        off = c->ring_len;
        pf__w_init(&w, c->ring + off, sizeof c->ring - off);
        build(c, &w, arg);
        if (!w.oflow) break;
        if (off == 0) {
            pf__err(c, "event does not fit in PF_RING_SIZE", NULL, 0);
            return PF_ETOOBIG;
        }
        if (ready && pf__now_ms() < deadline) { /* wait for acks, within the budget */
            int ev = pf__poll(c, POLLIN, deadline);
            if (ev > 0 && pf__drain(c) == 0) {
                pf__ring_gc(c);
                continue;
            }
            if (ev != 0) {
                pf__ring_gc(c);
                pf__fail(c);
                ready = 0;
                if (c->strict) return PF_ENOTCONN;
            }
        }
        if (c->strict) {
            pf__err(c, "the daemon is not acknowledging events (ring full)", NULL, 0);
            return PF_ETIMEDOUT;
        }
        if (!pf__evict(c)) { /* only a half-sent frame is left: this event is the one dropped */
            c->dropped[pf__kind_index(kind)]++;
            return 0;
        }
    }
    if (w.n - 4 > c->max_frame) {
        pf__err(c, "event is larger than the daemon's max_frame", NULL, 0);
        return PF_ETOOBIG;
    }
    c->ring_len += w.n;
    if (!ready) return 0; /* kept: sent once the daemon is back */
    rc = pf__pump(c, deadline, c->strict);
    if (rc == PF_ETIMEDOUT) { /* strict only */
        pf__err(c, "the daemon is not reading (send timed out)", NULL, 0);
        pf__fail(c);
        return rc;
    }
    if (rc != 0 || pf__drain(c) != 0) {
        rc = pf__lost(c, deadline, c->strict); /* resends this event too */
        if (rc == 0) rc = pf__pump(c, deadline, c->strict);
        if (c->strict && rc != 0) return rc < -99 ? PF_ENOTCONN : rc;
    }
    return 0;
}

/* ---- the outbox ---- */

/* mkdir -p of path (mode 0750, the umask applies); path is a NUL-terminated copy we may edit. */
static void pf__mkdirs(char *path) {
    size_t i;
    for (i = 1; path[i]; i++) {
        if (path[i] != '/') continue;
        path[i] = '\0';
        (void)mkdir(path, 0750);
        path[i] = '/';
    }
    (void)mkdir(path, 0750);
}

static size_t pf__cat(char *dst, size_t n, size_t cap, const char *src, size_t len) {
    if (n + len >= cap) len = cap - 1 - n;
    memcpy(dst + n, src, len);
    dst[n + len] = '\0';
    return n + len;
}

static size_t pf__cat_num(char *dst, size_t n, size_t cap, uint64_t v, int hex, unsigned width) {
    char digits[24];
    size_t k = 0;
    do {
        digits[sizeof digits - 1 - k++] = "0123456789abcdef"[hex ? v % 16 : v % 10];
        v = hex ? v / 16 : v / 10;
    } while ((v != 0 || k < width) && k < sizeof digits);
    return pf__cat(dst, n, cap, digits + sizeof digits - k, k);
}

/* One event into <outbox>/<id>.pfev (docs/protocol.md, "The outbox"): temp file, write the
 * hello and the event (head | output | mid | stack trace | tail | input), fsync, rename,
 * directory fsync. Async-signal-safe, no malloc. Returns 0 or PF_EOUTBOX (errmsg says why). */
static int pf__outbox_write(pf_client *c, const char *id, unsigned char *head, size_t head_n,
                            const char *output, size_t out_len, const unsigned char *mid,
                            size_t mid_n, const char *trace, size_t st_len,
                            const unsigned char *tail, size_t tail_n, const void *input,
                            size_t input_len) {
    char tmp[sizeof c->outbox + 128], final[sizeof c->outbox + 128];
    const char *dir = c->outbox_learned ? c->outbox_daemon : c->outbox;
    size_t dn = strlen(dir), n;
    uint64_t x;
    int fd = -1, attempt, e = 0;
    if (dn == 0) {
        pf__err(c, "no outbox directory known (set $PFCOLLECTOR_OUTBOX or $HOME)", NULL, 0);
        return PF_EOUTBOX;
    }
    pf__put_be64(head + PF__SEQ_OFFSET, 1); /* as the first event on a fresh connection */
    x = (uint64_t)pf__now_ns() ^ ((uint64_t)getpid() << 40);
    for (attempt = 0; attempt < 6 && fd < 0; attempt++) {
        size_t i;
        for (i = 0; i < sizeof c->id_seed; i++) x = (x ^ c->id_seed[i]) * 0x100000001B3ull;
        x ^= x >> 29;
        n = pf__cat(tmp, 0, sizeof tmp, dir, dn);
        n = pf__cat(tmp, n, sizeof tmp, "/.", 2);
        n = pf__cat(tmp, n, sizeof tmp, id, strlen(id));
        n = pf__cat(tmp, n, sizeof tmp, ".", 1);
        n = pf__cat_num(tmp, n, sizeof tmp, (uint64_t)getpid(), 0, 1);
        n = pf__cat(tmp, n, sizeof tmp, ".", 1);
        n = pf__cat_num(tmp, n, sizeof tmp, x & 0xFFFFFFFFFFFFull, 1, 12);
        n = pf__cat(tmp, n, sizeof tmp, ".tmp", 4);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
        if (fd < 0) {
            e = errno;
            if (e == ENOENT && attempt == 0) { /* no outbox yet: create it */
                char mk[sizeof c->outbox];
                memcpy(mk, dir, dn + 1);
                pf__mkdirs(mk);
            } else if (e != EEXIST) {
                break;
            }
        }
    }
    if (fd < 0) {
        pf__err(c, "cannot write the outbox ", dir, dn);
        pf__err_append(c, ": ", 2);
        pf__err_append(c, pf__errno_text(e), strlen(pf__errno_text(e)));
        return PF_EOUTBOX;
    }
    if (pf__write_all(fd, c->hello, c->hello_len) || pf__write_all(fd, head, head_n) ||
        pf__emit_text(c, fd, output, out_len, 0) || pf__write_all(fd, mid, mid_n) ||
        pf__emit_text(c, fd, trace, st_len, 0) || pf__write_all(fd, tail, tail_n) ||
        pf__write_all(fd, input, input_len) || fsync(fd) != 0) {
        e = errno;
        close(fd);
        unlink(tmp);
        pf__err(c, "cannot write the outbox file ", tmp, strlen(tmp));
        pf__err_append(c, ": ", 2);
        pf__err_append(c, pf__errno_text(e), strlen(pf__errno_text(e)));
        return PF_EOUTBOX;
    }
    close(fd);
    n = pf__cat(final, 0, sizeof final, dir, dn);
    n = pf__cat(final, n, sizeof final, "/", 1);
    n = pf__cat(final, n, sizeof final, id, strlen(id));
    (void)pf__cat(final, n, sizeof final, ".pfev", 5);
    if (rename(tmp, final) != 0) {
        e = errno;
        unlink(tmp);
        pf__err(c, "cannot rename into the outbox ", dir, dn);
        pf__err_append(c, ": ", 2);
        pf__err_append(c, pf__errno_text(e), strlen(pf__errno_text(e)));
        return PF_EOUTBOX;
    }
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    return 0;
}


/* ---- public API ---- */

static int pf__set_path(char *dst, size_t cap, const char *a, const char *b) {
    size_t na = strlen(a), nb = b ? strlen(b) : 0;
    if (na + nb + 1 > cap) return -1;
    memcpy(dst, a, na);
    if (nb) memcpy(dst + na, b, nb);
    dst[na + nb] = '\0';
    return 0;
}

/* An absolute copy of a directory name (relative ones are taken from the current directory). */
static int pf__set_dir(char *dst, size_t cap, const char *a, const char *b) {
    char cwd[sizeof ((pf_client *)0)->outbox];
    size_t n;
    if (a[0] == '/') return pf__set_path(dst, cap, a, b);
    if (getcwd(cwd, sizeof cwd) == NULL) return -1;
    n = strlen(cwd);
    if (n + 1 + strlen(a) + (b ? strlen(b) : 0) + 1 > cap) return -1;
    memcpy(dst, cwd, n);
    dst[n] = '/';
    return pf__set_path(dst + n + 1, cap - n - 1, a, b);
}

int pf_connect_opts(pf_client *c, const pf_options *o) {
    int saved = errno, rc;
    const char *path, *env;
    if (c == NULL) return PF_EINVAL;
    memset(c, 0, offsetof(pf_client, tmp)); /* the big buffers need no clearing */
    c->fd = -1;
    c->busy = 1; /* not usable until fully initialised */
    c->max_frame = PF__DEFAULT_MAX_FRAME;
    c->pid = (long)getpid();
    c->retry_at_ms = INT64_MAX; /* unusable until a successful pf_connect */
    if (o == NULL || !pf__valid_name(o->job_id) || !pf__valid_name(o->fuzzer)) {
        pf__err(c, "job_id and fuzzer must be 1..256 characters of UTF-8, no control characters",
                NULL, 0);
        return pf__leave(c, PF_EINVAL, saved);
    }
    c->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : PF_DEFAULT_TIMEOUT_MS;
    c->budget_ms = o->budget_ms > 0 ? o->budget_ms : PF_DEFAULT_BUDGET_MS;
    c->strict = o->strict != 0;
    path = o->socket_path;
    if (path == NULL || !*path) {
        if ((env = pf__getenv("PFCOLLECTOR_SOCKET")) != NULL && *env) {
            path = env;
        } else if ((env = pf__getenv("XDG_RUNTIME_DIR")) != NULL && *env) {
            if (pf__set_path(c->socket_path, sizeof c->socket_path, env, "/pfcollector.sock")) {
                pf__err(c, "$XDG_RUNTIME_DIR is too long for a socket path", NULL, 0);
                return pf__leave(c, PF_EINVAL, saved);
            }
            path = c->socket_path;
        } else { /* "/tmp/pfcollector-<uid>/pfcollector.sock" without snprintf */
            size_t n = pf__cat(c->socket_path, 0, sizeof c->socket_path, "/tmp/pfcollector-", 17);
            n = pf__cat_num(c->socket_path, n, sizeof c->socket_path, (uint64_t)getuid(), 0, 1);
            (void)pf__cat(c->socket_path, n, sizeof c->socket_path, "/pfcollector.sock", 17);
            path = c->socket_path;
        }
    }
    if (strlen(path) >= sizeof c->socket_path) {
        pf__err(c, "socket path longer than 107 bytes: ", path, strlen(path));
        return pf__leave(c, PF_EINVAL, saved);
    }
    if (path != c->socket_path) memcpy(c->socket_path, path, strlen(path) + 1);
    /* Where crashes go when no daemon acks them (a welcome's "outbox" takes precedence). */
    if (o->outbox != NULL && *o->outbox) {
        rc = pf__set_dir(c->outbox, sizeof c->outbox, o->outbox, NULL);
    } else if ((env = pf__getenv("PFCOLLECTOR_OUTBOX")) != NULL && *env) {
        rc = pf__set_dir(c->outbox, sizeof c->outbox, env, NULL);
    } else if ((env = pf__getenv("PFCOLLECTOR_DATA_DIR")) != NULL && *env) {
        rc = pf__set_dir(c->outbox, sizeof c->outbox, env, "/outbox");
    } else if ((env = pf__getenv("XDG_DATA_HOME")) != NULL && *env) {
        rc = pf__set_dir(c->outbox, sizeof c->outbox, env, "/pfcollector/outbox");
    } else if ((env = pf__getenv("HOME")) != NULL && *env) {
        rc = pf__set_dir(c->outbox, sizeof c->outbox, env, "/.local/share/pfcollector/outbox");
    } else {
        rc = 0; /* none: pf_crash says so if it ever needs one */
    }
    if (rc != 0) {
        pf__err(c, "outbox directory path too long (max 511 bytes)", NULL, 0);
        return pf__leave(c, PF_EINVAL, saved);
    }
    if (o->daemon_uid > 0) c->trust_uids[c->ntrust++] = (unsigned long)o->daemon_uid;
    if ((env = pf__getenv("PFCOLLECTOR_DAEMON_UID")) != NULL) { /* uids, comma-separated */
        const char *p = env;
        while (*p) {
            unsigned long v = 0;
            const char *start = p;
            while (*p == ' ') p++;
            if (*p == ',' || !*p) {
                if (*p) p++;
                continue;
            }
            while (*p >= '0' && *p <= '9' && v <= 0xFFFFFFFEul)
                v = v * 10 + (unsigned long)(*p++ - '0');
            while (*p == ' ') p++;
            if ((*p && *p != ',') || v > 0xFFFFFFFEul || p == start) {
                pf__err(c, "PFCOLLECTOR_DAEMON_UID must be uids separated by commas, got: ", env,
                        strlen(env));
                return pf__leave(c, PF_EINVAL, saved);
            }
            if (c->ntrust < (int)(sizeof c->trust_uids / sizeof c->trust_uids[0]))
                c->trust_uids[c->ntrust++] = v;
            if (*p) p++;
        }
    }
    memcpy(c->job_id, o->job_id, strlen(o->job_id) + 1);
    memcpy(c->fuzzer, o->fuzzer, strlen(o->fuzzer) + 1);
    pf__seed(c);
    pf__build_hello(c);
    c->retry_at_ms = 0;
    /* Fail-open, creating the client waits at most the budget: a hung daemon must not hold the
     * harness at start; the handshake goes on inside later calls (PF_ETIMEDOUT meanwhile). */
    rc = pf__ensure(c, pf__now_ms() + (c->strict ? c->timeout_ms : c->budget_ms), 1);
    return pf__leave(c, rc, saved);
}

int pf_connect(pf_client *c, const char *socket_path, const char *job_id, const char *fuzzer) {
    pf_options o;
    memset(&o, 0, sizeof o);
    o.socket_path = socket_path;
    o.job_id = job_id;
    o.fuzzer = fuzzer;
    return pf_connect_opts(c, &o);
}

void pf_set_timeout(pf_client *c, int timeout_ms) {
    if (c != NULL) c->timeout_ms = timeout_ms < 0 ? 0 : timeout_ms;
}

/* The crash frame in pieces: head (envelope .. output's str header) | output | mid (stack
 * trace key and header) | trace | tail (input key and bin header) | input. */
typedef struct pf__crash_frame {
    pf__w head, mid, tail;
    size_t out_len, st_len, total;
    unsigned char mid_buf[32], tail_buf[32];
} pf__crash_frame;

static int pf__crash_build(pf_client *c, pf__crash_frame *f, unsigned char *head_buf,
                           size_t head_cap, const char *id, const char *type, size_t input_len,
                           int signo, int exit_code, const char *output, const char *trace) {
    f->out_len = output ? pf__utf8_cut(output, strlen(output), PF__TEXT_MAX) : 0;
    f->st_len = trace ? pf__utf8_cut(trace, strlen(trace), PF__TEXT_MAX) : 0;
    pf__w_init(&f->head, head_buf, head_cap);
    pf__event_head(c, &f->head, 6, "crash", id);
    pf__w_key(&f->head, "type");
    pf__w_text(&f->head, type, PF__TYPE_MAX);
    pf__w_kint(&f->head, "signal", signo);
    pf__w_kint(&f->head, "exit_code", exit_code);
    pf__w_key(&f->head, "output");
    pf__w_str_hdr(&f->head, f->out_len);
    pf__w_init(&f->mid, f->mid_buf, sizeof f->mid_buf);
    pf__w_key(&f->mid, "stack_trace");
    pf__w_str_hdr(&f->mid, f->st_len);
    pf__w_init(&f->tail, f->tail_buf, sizeof f->tail_buf);
    pf__w_key(&f->tail, "input");
    pf__w_bin_hdr(&f->tail, input_len);
    if (f->head.oflow || f->mid.oflow || f->tail.oflow) return PF_EINVAL;
    f->total = f->head.n - 4 + f->out_len + f->mid.n + f->st_len + f->tail.n + input_len;
    pf__put_be32(f->head.p, (uint32_t)f->total);
    return 0;
}

static int pf__crash_to_outbox(pf_client *c, pf__crash_frame *f, const char *id,
                               const void *input, size_t input_len, const char *output,
                               const char *trace) {
    return pf__outbox_write(c, id, f->head.p, f->head.n, output, f->out_len, f->mid.p, f->mid.n,
                            trace, f->st_len, f->tail.p, f->tail.n, input, input_len);
}

/* pf_crash re-entered (a signal handler interrupted another call of this client): the socket
 * may be mid-frame, so the crash goes straight to the outbox, under an id of its own series. */
static int pf__crash_reentered(pf_client *c, const char *type, const void *input,
                               size_t input_len, int signo, int exit_code, const char *output,
                               const char *trace) {
    unsigned char head_buf[PF__TYPE_MAX + 256];
    char id[40];
    pf__crash_frame f;
    int rc;
    pf__make_id(c->id_seed, ++c->alt_counter, 1, id);
    rc = pf__crash_build(c, &f, head_buf, sizeof head_buf, id, type, input_len, signo,
                         exit_code, output, trace);
    if (rc != 0) return rc;
    return pf__crash_to_outbox(c, &f, id, input, input_len, output, trace);
}

int pf_crash(pf_client *c, const char *type, const void *input, size_t input_len, int signo,
             int exit_code, const char *output, const char *stack_trace) {
    int saved = errno, rc, reconnected = 0;
    int64_t deadline;
    pf__crash_frame f;
    if (c == NULL || type == NULL || (input == NULL && input_len > 0)) return PF_EINVAL;
    if (input_len > PF__INPUT_MAX) {
        pf__err(c, "crash input larger than 10 MiB", NULL, 0);
        return PF_ETOOBIG;
    }
    if (c->busy) {
        if (c->strict || c->hello_len == 0 || c->pid != (long)getpid()) {
            errno = saved;
            return PF_EBUSY;
        }
        rc = pf__crash_reentered(c, type, input, input_len, signo, exit_code, output,
                                 stack_trace);
        errno = saved;
        return rc;
    }
    PF__ENTER(c, saved);
    if (c->hello_len == 0) {
        pf__err(c, "pf_crash before a successful pf_connect", NULL, 0);
        return pf__leave(c, PF_EINVAL, saved);
    }
    deadline = pf__now_ms() + c->timeout_ms;
    rc = pf__crash_build(c, &f, c->tmp, sizeof c->tmp, NULL, type, input_len, signo, exit_code,
                         output, stack_trace);
    if (rc != 0) return pf__leave(c, rc, saved);
    if (f.total > PF__DEFAULT_MAX_FRAME) {
        pf__err(c, "crash event is larger than the daemon's max_frame", NULL, 0);
        return pf__leave(c, PF_ETOOBIG, saved);
    }
    if (c->retry_at_ms == INT64_MAX) rc = PF_ENOTCONN;
    else if (c->hung && !c->strict) /* no waiting until the daemon answers again */
        rc = pf__ensure(c, pf__now_ms() + c->budget_ms, 0);
    else rc = pf__ensure(c, deadline, 1);
    if (rc == 0) rc = pf__pump(c, deadline, 1); /* the kept events go first, whole */
    if (rc == PF_ETIMEDOUT) pf__err(c, "the daemon is not reading (send timed out)", NULL, 0);
    for (;;) {
        if (rc == PF__BROKEN) { /* reconnect once; resend with the same id, a fresh seq */
            if (reconnected) {
                pf__ring_gc(c);
                pf__fail(c);
                rc = PF_ENOTCONN;
                break;
            }
            reconnected = 1;
            rc = pf__lost(c, deadline, 1);
            if (rc == 0) rc = pf__pump(c, deadline, 1);
            continue;
        }
        if (rc != 0) break;
        if (f.total > c->max_frame) {
            pf__err(c, "crash event is larger than the daemon's max_frame", NULL, 0);
            c->crash_seq = 0;
            return pf__leave(c, PF_ETOOBIG, saved);
        }
        pf__ring_gc(c);
        c->crash_seq = ++c->seq;
        c->crash_rejected = 0;
        pf__put_be64(f.head.p + PF__SEQ_OFFSET, c->crash_seq);
        rc = pf__send_all(c, f.head.p, f.head.n, deadline);
        if (rc == 0) rc = pf__emit_text(c, -1, output, f.out_len, deadline);
        if (rc == 0) rc = pf__send_all(c, f.mid.p, f.mid.n, deadline);
        if (rc == 0) rc = pf__emit_text(c, -1, stack_trace, f.st_len, deadline);
        if (rc == 0) rc = pf__send_all(c, f.tail.p, f.tail.n, deadline);
        if (rc == 0) rc = pf__send_all(c, input, input_len, deadline);
        while (rc == 0 && c->acked < c->crash_seq && !c->crash_rejected) {
            int ev = pf__poll(c, POLLIN, deadline);
            if (ev == 0) rc = PF_ETIMEDOUT;
            else if (ev < 0) rc = PF__BROKEN;
            else rc = pf__drain(c);
        }
        if (c->acked >= c->crash_seq || c->crash_rejected) { /* answered */
            if (rc == PF__BROKEN) { /* then the daemon went away: the next call reconnects */
                pf__ring_gc(c);
                pf__drop(c);
            }
            rc = c->crash_rejected ? PF_EREJECTED : 0;
            break;
        }
        if (rc == PF_ETIMEDOUT) pf__err(c, "crash not acknowledged by the daemon in time", NULL, 0);
        break;
    }
    if (rc == PF_ETIMEDOUT) { /* hung: drop the stream (maybe half sent); crashes skip the */
        pf__ring_gc(c);       /* wait until a welcome comes again */
        if (c->fd >= 0) pf__fail(c);
        c->hung = 1;
    }
    c->crash_seq = 0;
    pf__ring_gc(c);
    if (rc == PF_EREJECTED && c->crash_retry) rc = PF_ETIMEDOUT; /* "not now": the outbox */
    if (rc != 0 && rc != PF_EREJECTED && !c->strict) { /* no durable ack: the outbox keeps it */
        int orc = pf__crash_to_outbox(c, &f, c->last_id, input, input_len, output, stack_trace);
        if (orc == 0) c->outboxed++;
        rc = orc;
    }
    return pf__leave(c, rc, saved);
}

typedef struct pf__cov_args {
    int64_t edges, new_edges, exec_count;
} pf__cov_args;

static void pf__build_coverage(pf_client *c, pf__w *w, const void *arg) {
    const pf__cov_args *a = (const pf__cov_args *)arg;
    pf__event_head(c, w, 3, "coverage", NULL);
    pf__w_kint(w, "edges", a->edges);
    pf__w_kint(w, "new_edges", a->new_edges);
    pf__w_kint(w, "exec_count", a->exec_count);
    pf__w_finish(w, 0);
}

int pf_coverage(pf_client *c, int64_t edges, int64_t new_edges, int64_t exec_count) {
    int saved = errno;
    pf__cov_args a;
    if (c == NULL) return PF_EINVAL;
    PF__ENTER(c, saved);
    a.edges = edges;
    a.new_edges = new_edges;
    a.exec_count = exec_count;
    return pf__leave(c, pf__submit(c, pf__build_coverage, &a, "coverage"), saved);
}

typedef struct pf__corpus_args {
    const char *const *files;
    size_t nfiles;
    int64_t total_size;
} pf__corpus_args;

static void pf__build_corpus(pf_client *c, pf__w *w, const void *arg) {
    const pf__corpus_args *a = (const pf__corpus_args *)arg;
    size_t i;
    pf__event_head(c, w, 2, "corpus", NULL);
    pf__w_key(w, "files");
    if (a->nfiles < 16) pf__w_be(w, 0x90u | (unsigned)a->nfiles, 0, 0);
    else pf__w_be(w, 0xDC, a->nfiles, 2);
    for (i = 0; i < a->nfiles; i++) pf__w_text(w, a->files[i], (size_t)-1);
    pf__w_kint(w, "total_size", a->total_size);
    pf__w_finish(w, 0);
}

int pf_corpus(pf_client *c, const char *const *files, size_t nfiles, int64_t total_size) {
    int saved = errno;
    size_t i;
    pf__corpus_args a;
    if (c == NULL) return PF_EINVAL;
    if (files == NULL || nfiles == 0 || nfiles > PF__FILES_MAX) {
        pf__err(c, "pf_corpus needs 1..1024 file names", NULL, 0);
        return PF_EINVAL;
    }
    for (i = 0; i < nfiles; i++) {
        if (files[i] == NULL || pf__utf8_chars(files[i], strlen(files[i])) > PF__PATH_MAX) {
            pf__err(c, "pf_corpus: a file name is NULL or longer than 4096 characters", NULL, 0);
            return PF_EINVAL;
        }
    }
    PF__ENTER(c, saved);
    a.files = files;
    a.nfiles = nfiles;
    a.total_size = total_size;
    return pf__leave(c, pf__submit(c, pf__build_corpus, &a, "corpus"), saved);
}

static void pf__build_stats(pf_client *c, pf__w *w, const void *arg) {
    const pf_stats_t *s = (const pf_stats_t *)arg;
    pf__event_head(c, w, 10, "stats", NULL);
    pf__w_kint(w, "executions", s->executions);
    pf__w_kf64(w, "exec_per_second", s->exec_per_second);
    pf__w_kint(w, "total_edges", s->total_edges);
    pf__w_kint(w, "covered_edges", s->covered_edges);
    pf__w_kf64(w, "coverage_percent", s->coverage_percent);
    pf__w_kint(w, "unique_crashes", s->unique_crashes);
    pf__w_kint(w, "total_crashes", s->total_crashes);
    pf__w_kint(w, "corpus_size", s->corpus_size);
    pf__w_kf64(w, "cpu_usage", s->cpu_usage);
    pf__w_kint(w, "memory_usage", s->memory_usage);
    pf__w_finish(w, 0);
}

int pf_stats(pf_client *c, const pf_stats_t *stats) {
    int saved = errno;
    if (c == NULL || stats == NULL) return PF_EINVAL;
    PF__ENTER(c, saved);
    return pf__leave(c, pf__submit(c, pf__build_stats, stats, "stats"), saved);
}

typedef struct pf__life_args {
    const char *kind, *message;
} pf__life_args;

static void pf__build_lifecycle(pf_client *c, pf__w *w, const void *arg) {
    const pf__life_args *a = (const pf__life_args *)arg;
    pf__event_head(c, w, 1, a->kind, NULL);
    pf__w_key(w, "message");
    pf__w_text(w, a->message, PF__TEXT_MAX);
    pf__w_finish(w, 0);
}

int pf_lifecycle(pf_client *c, const char *kind, const char *message) {
    int saved = errno;
    pf__life_args a;
    if (c == NULL) return PF_EINVAL;
    if (kind == NULL || (strcmp(kind, "started") && strcmp(kind, "stopped") &&
                         strcmp(kind, "error") && strcmp(kind, "timeout"))) {
        pf__err(c, "pf_lifecycle kind must be started, stopped, error or timeout", NULL, 0);
        return PF_EINVAL;
    }
    PF__ENTER(c, saved);
    a.kind = kind;
    a.message = message;
    return pf__leave(c, pf__submit(c, pf__build_lifecycle, &a, kind), saved);
}

int pf_flush(pf_client *c, int timeout_ms) {
    int saved = errno, rc, reconnected = 0;
    int64_t deadline;
    if (c == NULL) return PF_EINVAL;
    PF__ENTER(c, saved);
    deadline = pf__now_ms() + (timeout_ms < 0 ? 0 : timeout_ms);
    if (c->fd < 0 && c->retry_at_ms != INT64_MAX) c->retry_at_ms = 0; /* a waiting call: try */
    rc = c->retry_at_ms == INT64_MAX ? PF_ENOTCONN : pf__ensure(c, deadline, 1);
    while (rc == 0) {
        rc = pf__pump(c, deadline, 1);
        if (rc == 0) rc = pf__drain(c);
        pf__ring_gc(c);
        if (c->ring_sent == c->ring_len && c->acked >= c->seq) { /* all answered */
            if (rc != 0) pf__drop(c); /* ... even if the daemon left right after */
            rc = 0;
            break;
        }
        if (rc == 0) {
            int ev = pf__poll(c, POLLIN, deadline);
            if (ev == 0) {
                pf__err(c, "events not acknowledged by the daemon in time", NULL, 0);
                rc = PF_ETIMEDOUT;
                break;
            }
            if (ev > 0) continue;
        }
        if (rc == PF_ETIMEDOUT) {
            pf__err(c, "events not acknowledged by the daemon in time", NULL, 0);
            break;
        }
        if (reconnected) {
            pf__fail(c);
            rc = PF_ENOTCONN;
            break;
        }
        reconnected = 1;
        rc = pf__lost(c, deadline, 1); /* resends the ring */
    }
    if (rc == 0 && c->unreported) {
        c->unreported = 0;
        rc = PF_EREJECTED;
    }
    return pf__leave(c, rc, saved);
}

/* The id of a kept frame (after "kind": <fixstr>, "id": <str>), into out[40]; 0 or -1. */
static int pf__frame_id(const unsigned char *f, char *out) {
    size_t off = PF__SEQ_OFFSET + 8 + 5, len;
    off += 1 + (f[off] & 0x1Fu);
    if (memcmp(f + off, "\xa2id", 3) != 0) return -1;
    off += 3;
    if ((f[off] & 0xE0u) == 0xA0u) len = f[off++] & 0x1Fu;
    else if (f[off] == 0xD9) len = f[off + 1], off += 2;
    else return -1;
    if (len == 0 || len > 39) return -1;
    memcpy(out, f + off, len);
    out[len] = '\0';
    return 0;
}

void pf_close(pf_client *c) {
    int saved = errno;
    size_t off;
    if (c == NULL) return;
    if (!c->strict && !c->busy && c->hello_len && c->pid == (long)getpid()) {
        c->busy = 1; /* kept lifecycle and corpus events outlive us in the outbox */
        pf__ring_gc(c);
        for (off = 0; off < c->ring_len; off += pf__frame_len(c->ring + off)) {
            unsigned char *f = c->ring + off;
            int kind = pf__frame_kind(f);
            char id[40];
            if (kind == PF__KIND_STATS || kind == PF__KIND_COVERAGE || pf__frame_id(f, id))
                continue;
            if (pf__outbox_write(c, id, f, pf__frame_len(f), NULL, 0, NULL, 0, NULL, 0, NULL, 0,
                                 NULL, 0) == 0)
                c->outboxed++;
        }
        c->busy = 0;
    }
    if (c->fd >= 0) close(c->fd); /* after fork: the child's own copy */
    c->fd = -1;
    c->welcomed = 0;
    c->ring_len = c->ring_sent = c->part_sent = 0;
    c->retry_at_ms = INT64_MAX; /* closed: no more reconnecting (crashes still go to the outbox) */
    errno = saved;
}

int pf_is_connected(const pf_client *c) { return c != NULL && c->fd >= 0 && c->welcomed; }

const char *pf_last_error(const pf_client *c) { return c == NULL ? "" : c->errmsg; }

const char *pf_last_event_id(const pf_client *c) { return c == NULL ? "" : c->last_id; }

const char *pf_outbox_dir(const pf_client *c) {
    if (c == NULL) return "";
    return c->outbox_learned ? c->outbox_daemon : c->outbox;
}

uint64_t pf_dropped(const pf_client *c, const char *kind) {
    uint64_t total = 0;
    int i;
    if (c == NULL) return 0;
    for (i = 0; i < PF_NKINDS; i++)
        if (kind == NULL || strcmp(kind, pf__kinds[i]) == 0) total += c->dropped[i];
    return total;
}

uint64_t pf_outboxed(const pf_client *c) { return c == NULL ? 0 : c->outboxed; }

const char *pf_strerror(int code) {
    switch (code) {
    case PF_OK: return "ok";
    case PF_EINVAL: return "invalid argument";
    case PF_ENOTCONN: return "pfcollector daemon not reachable";
    case PF_ETIMEDOUT: return "timed out waiting for the pfcollector daemon";
    case PF_EREJECTED: return "event refused by the pfcollector daemon";
    case PF_ETOOBIG: return "event too large";
    case PF_EPROTO: return "pfcollector protocol error";
    case PF_EBUSY: return "pfclient re-entered while busy";
    case PF_EUNTRUSTED: return "the socket's listener is not a trusted pfcollector daemon";
    case PF_EOUTBOX: return "no daemon ack and the outbox could not be written";
    default: return "unknown pfclient error";
    }
}

#ifdef __cplusplus
}
#endif
#endif /* PFCLIENT_IMPLEMENTED */
#endif /* PFCLIENT_IMPLEMENTATION */
