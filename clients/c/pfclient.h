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
 *     static pf_client pf;                       // ~72 KiB: make it static, not a stack local
 *     pf_connect(&pf, NULL, "job-42", "libfuzzer"); // NULL = default socket path (see below)
 *     pf_stats_t st; memset(&st, 0, sizeof st); st.executions = n; pf_stats(&pf, &st);
 *     pf_coverage(&pf, edges, new_edges, n);
 *     pf_crash(&pf, "SEGV", data, size, 11, 0, "", report);  // waits until stored on disk
 *     pf_flush(&pf, 2000);
 *     pf_close(&pf);
 *
 * API (every int-returning call: 0 = success, a negative PF_E* code otherwise):
 *
 *   int  pf_connect(pf_client *c, const char *socket_path, const char *job_id,
 *                   const char *fuzzer);
 *        Initialises *c and connects (hello, waits for welcome). socket_path NULL means the
 *        default rule of docs/protocol.md: $PFCOLLECTOR_SOCKET, else
 *        $XDG_RUNTIME_DIR/pfcollector.sock, else /tmp/pfcollector-<uid>.sock. job_id and fuzzer
 *        must be 1..256 characters of valid UTF-8 without control characters (PF_EINVAL).
 *        Even when it fails with PF_ENOTCONN/PF_ETIMEDOUT/PF_EPROTO the client is usable: every
 *        later call retries the connection (with a backoff, 100 ms doubling to 5 s).
 *   void pf_set_timeout(pf_client *c, int timeout_ms);
 *        Bound for connecting and for every wait inside a call (default 5000 ms).
 *   int  pf_crash(pf_client *c, const char *type, const void *input, size_t input_len,
 *                 int signal, int exit_code, const char *output, const char *stack_trace);
 *        Sends a crash and WAITS for its acknowledgement (= stored durably by the daemon). If
 *        the connection breaks meanwhile it reconnects once and resends the crash with the same
 *        event id. The input is written straight from the caller's buffer (no copy, up to the
 *        daemon's 10 MiB limit); type is cut to 256 bytes, output and stack_trace to 65536
 *        bytes, at a UTF-8 boundary; NULL output/stack_trace mean "". Returns PF_EREJECTED if
 *        the daemon refused it (see pf_last_error).
 *   int  pf_coverage(pf_client *c, int64_t edges, int64_t new_edges, int64_t exec_count);
 *   int  pf_corpus(pf_client *c, const char *const *files, size_t nfiles, int64_t total_size);
 *        1..1024 names of at most 4096 characters each, and the whole event must fit in
 *        PF_RING_SIZE (else PF_ETOOBIG: split the list over several calls).
 *   int  pf_stats(pf_client *c, const pf_stats_t *stats);     (the fuzzer_stats fields)
 *   int  pf_lifecycle(pf_client *c, const char *kind, const char *message);
 *        kind is "started", "stopped", "error" or "timeout"; message cut to 65536 bytes.
 *        These four do not wait: the frame is written and kept in a fixed ring buffer
 *        (PF_RING_SIZE bytes) until acknowledged, and resent after a reconnect with the same
 *        event id. Only when the ring is full does a call wait (for acks, up to the timeout).
 *   int  pf_flush(pf_client *c, int timeout_ms);
 *        Waits until the daemon has acknowledged every event sent so far. Returns PF_EREJECTED
 *        when events were refused since the previous flush (pf_last_error says the last one).
 *   void pf_close(pf_client *c);           Closes the socket (does not flush). Idempotent.
 *   int  pf_is_connected(const pf_client *c);
 *   const char *pf_last_error(const pf_client *c);       Human-readable, "" when none.
 *   const char *pf_last_event_id(const pf_client *c);    Id of the last event built.
 *   const char *pf_strerror(int code);
 *
 * ERRORS: PF_EINVAL bad argument (nothing sent); PF_ENOTCONN daemon unreachable (the event is
 * dropped, not queued; calls return at once while the reconnect backoff runs); PF_ETIMEDOUT no
 * acknowledgement in time; PF_EREJECTED the daemon refused the event (non-fatal); PF_ETOOBIG
 * larger than the daemon's max_frame / 10 MiB input / the ring; PF_EPROTO the daemon refused
 * the hello or sent garbage; PF_EBUSY the client is already inside a call (re-entered from a
 * signal handler).
 *
 * DESIGN FOR HARNESSES: fail-open (a missing or dying daemon costs an error code, never the
 * fuzzer: writes use MSG_NOSIGNAL, the socket is non-blocking and every wait is bounded); no
 * malloc anywhere (all buffers live inside pf_client); only async-signal-safe system calls
 * (socket, connect, send, recv, poll, clock_gettime, getpid, open, read, close, fcntl), and
 * errno is preserved, so pf_crash may be called from a signal handler or a sanitizer callback
 * as long as that client is not in another call at the moment (PF_EBUSY). Not thread-safe:
 * one client per thread, or a lock around calls. After fork() the child notices (getpid) and
 * opens its own connection; the parent's unacknowledged events stay the parent's.
 * Strings are sent as msgpack str; bytes that are not valid UTF-8 are replaced by '?' (the
 * daemon would refuse the whole frame otherwise). Event ids are UUID-formatted: 16 random
 * bytes from /dev/urandom per process plus a counter.
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

#include <stddef.h>
#include <stdint.h>

#ifndef PF_RING_SIZE
#define PF_RING_SIZE (64 * 1024)
#endif
#define PF_RBUF_SIZE 4096

#define PF_OK 0
#define PF_EINVAL (-1)
#define PF_ENOTCONN (-2)
#define PF_ETIMEDOUT (-3)
#define PF_EREJECTED (-4)
#define PF_ETOOBIG (-5)
#define PF_EPROTO (-6)
#define PF_EBUSY (-7)

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

/* Treat as opaque; the fields are public only so it can be allocated statically. */
typedef struct pf_client {
    int fd;               /* -1 when not connected */
    int busy;             /* inside a call (re-entrancy guard) */
    int ring_fresh;       /* every ring entry carries a seq of the current connection */
    int welcomed, refused;
    int crash_rejected;
    int timeout_ms, backoff_ms;
    long pid;             /* owner process, to notice fork() */
    int64_t retry_at_ms;  /* no connection attempt before this (monotonic ms) */
    uint64_t seq, acked, crash_seq;
    uint64_t max_frame;
    uint64_t id_counter;
    unsigned rejected, unreported;
    size_t ring_len, rlen, rskip;
    unsigned char id_seed[16];
    char socket_path[108];
    char job_id[1028];
    char fuzzer[1028];
    char last_id[40];
    char errmsg[256];
    unsigned char tmp[1024];
    unsigned char rbuf[PF_RBUF_SIZE];
    unsigned char ring[PF_RING_SIZE];
} pf_client;

int pf_connect(pf_client *c, const char *socket_path, const char *job_id, const char *fuzzer);
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
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

/* ---- time, errors ---- */

static int64_t pf__now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
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
    default: return "connect failed";
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

/* A UUID-formatted id: the seed with (its low 48 bits + counter) and the version-4 bits. */
static void pf__new_id(pf_client *c) {
    static const char hex[] = "0123456789abcdef";
    unsigned char b[16];
    uint64_t low = 0;
    size_t i, n = 0;
    memcpy(b, c->id_seed, sizeof b);
    for (i = 10; i < 16; i++) low = (low << 8) | b[i];
    low += ++c->id_counter;
    for (i = 15; i >= 10; i--) {
        b[i] = (unsigned char)low;
        low >>= 8;
    }
    b[6] = (unsigned char)((b[6] & 0x0F) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3F) | 0x80);
    for (i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) c->last_id[n++] = '-';
        c->last_id[n++] = hex[b[i] >> 4];
        c->last_id[n++] = hex[b[i] & 15];
    }
    c->last_id[n] = '\0';
}

/* The envelope every event frame starts with; seq is always 8 bytes at PF__SEQ_OFFSET so a
 * kept frame can be renumbered in place when it is resent on a new connection. */
static void pf__event_head(pf_client *c, pf__w *w, unsigned nkeys, const char *kind) {
    pf__w_room(w, 4); /* length prefix, filled in by pf__w_finish */
    pf__w_be(w, 0x80u | (5u + nkeys), 0, 0);
    pf__w_key(w, "t");
    pf__w_key(w, "event");
    pf__w_key(w, "seq");
    pf__w_be(w, 0xCF, 0, 8);
    pf__w_key(w, "kind");
    pf__w_key(w, kind);
    pf__new_id(c);
    pf__w_key(w, "id");
    pf__w_key(w, c->last_id);
    pf__w_kf64(w, "ts", pf__wall());
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
    pf__val key, val, t, code, msg;
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
        else if (pf__str_is(&key, "fatal") && val.type == 1) fatal = (int)val.i;
    }
    if (r.i != r.n || t.type != 3) return PF_EPROTO;
    if (pf__str_is(&t, "ack")) {
        if (seq > 0 && (uint64_t)seq > c->acked) c->acked = (uint64_t)seq;
    } else if (pf__str_is(&t, "welcome")) {
        c->welcomed = 1;
        if (max_frame > 0) c->max_frame = (uint64_t)max_frame;
    } else if (pf__str_is(&t, "error")) {
        if (!c->welcomed || fatal) c->refused = 1;
        if (seq > 0 && (uint64_t)seq == c->crash_seq) {
            c->crash_rejected = 1;
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
    c->ring_fresh = 0;
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

/* Sends s[0..n) as msgpack str bytes, replacing invalid UTF-8, through a small stack chunk. */
static int pf__send_text(pf_client *c, const char *s, size_t n, int64_t deadline) {
    unsigned char chunk[512];
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, used = 0, k;
    int rc;
    while (i < n) {
        k = pf__utf8_seq(u + i, n - i);
        if (used + 4 > sizeof chunk) {
            if ((rc = pf__send_all(c, chunk, used, deadline)) != 0) return rc;
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
    return used ? pf__send_all(c, chunk, used, deadline) : 0;
}

/* ---- the ring of unacknowledged events ---- */

static size_t pf__frame_len(const unsigned char *f) { return 4 + (size_t)pf__get_be32(f); }

static uint64_t pf__frame_seq(const unsigned char *f) {
    uint64_t v = 0;
    int i;
    for (i = 0; i < 8; i++) v = (v << 8) | f[PF__SEQ_OFFSET + i];
    return v;
}

/* Forgets the acknowledged prefix (only when every entry's seq is of this connection). */
static void pf__ring_gc(pf_client *c) {
    size_t off = 0;
    if (!c->ring_fresh) return;
    while (off < c->ring_len && pf__frame_seq(c->ring + off) <= c->acked)
        off += pf__frame_len(c->ring + off);
    if (off) {
        memmove(c->ring, c->ring + off, c->ring_len - off);
        c->ring_len -= off;
    }
}

/* Sends the frame at ring offset off under a fresh seq. */
static int pf__ring_send(pf_client *c, size_t off, int64_t deadline) {
    unsigned char *f = c->ring + off;
    pf__put_be64(f + PF__SEQ_OFFSET, ++c->seq);
    return pf__send_all(c, f, pf__frame_len(f), deadline);
}

static int pf__leave(pf_client *c, int rc, int saved_errno) {
    c->busy = 0;
    errno = saved_errno;
    return rc;
}

/* Every public call that does I/O starts with this (c non-NULL, saved = the caller's errno). */
#define PF__ENTER(c, saved, rc)                                                                   \
    do {                                                                                          \
        if ((c)->busy) {                                                                          \
            errno = (saved);                                                                      \
            return PF_EBUSY;                                                                      \
        }                                                                                         \
        (c)->busy = 1;                                                                            \
        if (((rc) = pf__enter(c)) != 0) return pf__leave((c), (rc), (saved));                     \
    } while (0)

/* ---- connecting ---- */

static void pf__fail(pf_client *c) {
    pf__drop(c);
    c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : PF__BACKOFF_MIN;
    if (c->backoff_ms > PF__BACKOFF_MAX) c->backoff_ms = PF__BACKOFF_MAX;
    c->retry_at_ms = pf__now_ms() + c->backoff_ms;
}

/* Connect, hello, welcome, then resend every kept event with fresh seqs. */
static int pf__open(pf_client *c) {
    struct sockaddr_un addr;
    int64_t deadline = pf__now_ms() + c->timeout_ms;
    size_t plen = strlen(c->socket_path), off;
    pf__w w;
    int fd, rc, ev;

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
    c->fd = fd;
    c->seq = c->acked = c->crash_seq = 0;
    c->welcomed = c->refused = 0;
    c->max_frame = PF__DEFAULT_MAX_FRAME;

    pf__w_init(&w, c->tmp, sizeof c->tmp);
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
    pf__w_finish(&w, 0);
    rc = w.oflow ? PF_EINVAL : pf__send_all(c, w.p, w.n, deadline);
    while (rc == 0 && !c->welcomed && !c->refused) {
        ev = pf__poll(c, POLLIN, deadline);
        if (ev == 0) rc = PF_ETIMEDOUT;
        else if (ev < 0) rc = PF__BROKEN;
        else rc = pf__drain(c);
    }
    if (c->refused) {
        pf__fail(c);
        return PF_EPROTO; /* errmsg holds the daemon's error */
    }
    if (rc != 0) {
        if (rc == PF_ETIMEDOUT) pf__err(c, "no welcome from the daemon in time", NULL, 0);
        else if (rc == PF__BROKEN) pf__err(c, "the daemon closed the connection during hello", NULL, 0);
        pf__fail(c);
        return rc == PF_ETIMEDOUT ? PF_ETIMEDOUT : PF_ENOTCONN;
    }
    for (off = 0; off < c->ring_len; off += pf__frame_len(c->ring + off)) {
        rc = pf__ring_send(c, off, deadline); /* same id, fresh seq */
        if (rc != 0) {
            pf__fail(c);
            return rc == PF_ETIMEDOUT ? PF_ETIMEDOUT : PF_ENOTCONN;
        }
    }
    c->ring_fresh = 1;
    c->backoff_ms = 0;
    c->retry_at_ms = 0;
    return 0;
}

/* Entering a public call (after PF__ENTER's re-entrancy guard): fork detection, then the
 * connection, with the backoff. */
static int pf__enter(pf_client *c) {
    long pid;
    pid = (long)getpid();
    if (pid != c->pid) { /* forked: the socket and the kept events are the parent's */
        if (c->fd >= 0) close(c->fd);
        c->fd = -1;
        c->ring_len = 0;
        c->ring_fresh = 0;
        c->pid = pid;
        c->backoff_ms = 0;
        c->retry_at_ms = 0;
        pf__seed(c);
    }
    if (c->fd >= 0) return 0;
    if (pf__now_ms() < c->retry_at_ms) {
        if (!c->errmsg[0]) pf__err(c, "the pfcollector daemon is not reachable", NULL, 0);
        return PF_ENOTCONN;
    }
    return pf__open(c);
}

/* After a broken connection inside a call: reconnect once (resending the ring). */
static int pf__recover(pf_client *c, int *reconnected) {
    pf__ring_gc(c); /* what was acknowledged before the break need not be resent */
    pf__drop(c);
    if (*reconnected) {
        pf__fail(c);
        return PF_ENOTCONN;
    }
    *reconnected = 1;
    return pf__open(c);
}

/* Queue-and-send of a non-waiting event whose frame the builder writes into the ring tail. */
typedef void (*pf__builder)(pf_client *c, pf__w *w, const void *arg);

static int pf__submit(pf_client *c, pf__builder build, const void *arg) {
    int64_t deadline = pf__now_ms() + c->timeout_ms;
    int reconnected = 0, rc;
    size_t off;
    pf__w w;
    for (;;) {
        rc = pf__drain(c);
        if (rc == PF__BROKEN) {
            if ((rc = pf__recover(c, &reconnected)) != 0) return rc;
            continue;
        }
        pf__ring_gc(c);
        off = c->ring_len;
        pf__w_init(&w, c->ring + off, sizeof c->ring - off);
        build(c, &w, arg);
        if (!w.oflow) break;
        if (off == 0) {
            pf__err(c, "event does not fit in PF_RING_SIZE", NULL, 0);
            return PF_ETOOBIG;
        }
        rc = pf__poll(c, POLLIN, deadline); /* ring full: wait for acks */
        if (rc == 0) {
            pf__err(c, "the daemon is not acknowledging events (ring full)", NULL, 0);
            return PF_ETIMEDOUT;
        }
    }
    if (w.n - 4 > c->max_frame) {
        pf__err(c, "event is larger than the daemon's max_frame", NULL, 0);
        return PF_ETOOBIG;
    }
    c->ring_len += w.n;
    rc = pf__ring_send(c, off, deadline);
    if (rc == PF_ETIMEDOUT) {
        pf__fail(c); /* half a frame went out: this connection is unusable */
        return rc;
    }
    if (rc != 0) return pf__recover(c, &reconnected); /* resends this event too */
    return pf__drain(c) == PF__BROKEN ? pf__recover(c, &reconnected) : 0;
}


/* ---- public API ---- */

int pf_connect(pf_client *c, const char *socket_path, const char *job_id, const char *fuzzer) {
    int saved = errno, rc;
    const char *path = socket_path;
    char fallback[64];
    if (c == NULL) return PF_EINVAL;
    memset(c, 0, offsetof(pf_client, tmp)); /* the big buffers need no clearing */
    c->fd = -1;
    c->timeout_ms = 5000;
    c->max_frame = PF__DEFAULT_MAX_FRAME;
    c->pid = (long)getpid();
    c->busy = 1; /* not usable until fully initialised */
    if (!pf__valid_name(job_id) || !pf__valid_name(fuzzer)) {
        pf__err(c, "job_id and fuzzer must be 1..256 characters of UTF-8, no control characters",
                NULL, 0);
        c->retry_at_ms = INT64_MAX; /* unusable until a successful pf_connect */
        return pf__leave(c, PF_EINVAL, saved);
    }
    if (path == NULL || !*path) {
        const char *env = getenv("PFCOLLECTOR_SOCKET");
        if (env != NULL && *env) {
            path = env;
        } else if ((env = getenv("XDG_RUNTIME_DIR")) != NULL && *env) {
            size_t n = strlen(env);
            if (n + sizeof "/pfcollector.sock" > sizeof c->socket_path) {
                pf__err(c, "$XDG_RUNTIME_DIR is too long for a socket path", NULL, 0);
                return pf__leave(c, PF_EINVAL, saved);
            }
            memcpy(c->socket_path, env, n);
            memcpy(c->socket_path + n, "/pfcollector.sock", sizeof "/pfcollector.sock");
            path = c->socket_path;
        } else {
            pf__w w; /* "/tmp/pfcollector-<uid>.sock" without snprintf */
            char digits[24];
            unsigned long uid = (unsigned long)getuid();
            size_t nd = 0;
            do {
                digits[sizeof digits - 1 - nd++] = (char)('0' + uid % 10);
                uid /= 10;
            } while (uid);
            pf__w_init(&w, (unsigned char *)fallback, sizeof fallback);
            pf__w_raw(&w, "/tmp/pfcollector-", 17);
            pf__w_raw(&w, digits + sizeof digits - nd, nd);
            pf__w_raw(&w, ".sock", 6);
            path = fallback;
        }
    }
    if (strlen(path) >= sizeof c->socket_path) {
        pf__err(c, "socket path longer than 107 bytes: ", path, strlen(path));
        return pf__leave(c, PF_EINVAL, saved);
    }
    if (path != c->socket_path) memcpy(c->socket_path, path, strlen(path) + 1);
    memcpy(c->job_id, job_id, strlen(job_id) + 1);
    memcpy(c->fuzzer, fuzzer, strlen(fuzzer) + 1);
    pf__seed(c);
    rc = pf__open(c);
    return pf__leave(c, rc, saved);
}

void pf_set_timeout(pf_client *c, int timeout_ms) {
    if (c != NULL) c->timeout_ms = timeout_ms < 0 ? 0 : timeout_ms;
}

int pf_crash(pf_client *c, const char *type, const void *input, size_t input_len, int signo,
             int exit_code, const char *output, const char *stack_trace) {
    int saved = errno, rc, reconnected = 0;
    int64_t deadline;
    size_t out_len, st_len, total;
    unsigned char mid[32], tail[32];
    pf__w head, w2, w3;
    if (c == NULL || type == NULL || (input == NULL && input_len > 0)) return PF_EINVAL;
    if (input_len > PF__INPUT_MAX) {
        pf__err(c, "crash input larger than 10 MiB", NULL, 0);
        return PF_ETOOBIG;
    }
    PF__ENTER(c, saved, rc);
    deadline = pf__now_ms() + c->timeout_ms;
    out_len = output ? pf__utf8_cut(output, strlen(output), PF__TEXT_MAX) : 0;
    st_len = stack_trace ? pf__utf8_cut(stack_trace, strlen(stack_trace), PF__TEXT_MAX) : 0;

    /* head .. "output": <str header> | output | "stack_trace": <hdr> | trace | "input": <hdr> | input */
    pf__w_init(&head, c->tmp, sizeof c->tmp);
    pf__event_head(c, &head, 6, "crash");
    pf__w_key(&head, "type");
    pf__w_text(&head, type, PF__TYPE_MAX);
    pf__w_kint(&head, "signal", signo);
    pf__w_kint(&head, "exit_code", exit_code);
    pf__w_key(&head, "output");
    pf__w_str_hdr(&head, out_len);
    pf__w_init(&w2, mid, sizeof mid);
    pf__w_key(&w2, "stack_trace");
    pf__w_str_hdr(&w2, st_len);
    pf__w_init(&w3, tail, sizeof tail);
    pf__w_key(&w3, "input");
    pf__w_bin_hdr(&w3, input_len);
    total = head.n - 4 + out_len + w2.n + st_len + w3.n + input_len;
    if (head.oflow || w2.oflow || w3.oflow) return pf__leave(c, PF_EINVAL, saved);
    pf__put_be32(head.p, (uint32_t)total);

    for (;;) {
        if (total > c->max_frame) {
            pf__err(c, "crash event is larger than the daemon's max_frame", NULL, 0);
            return pf__leave(c, PF_ETOOBIG, saved);
        }
        pf__ring_gc(c);
        c->crash_seq = ++c->seq;
        c->crash_rejected = 0;
        pf__put_be64(head.p + PF__SEQ_OFFSET, c->crash_seq);
        rc = pf__send_all(c, head.p, head.n, deadline);
        if (rc == 0) rc = pf__send_text(c, output, out_len, deadline);
        if (rc == 0) rc = pf__send_all(c, w2.p, w2.n, deadline);
        if (rc == 0) rc = pf__send_text(c, stack_trace, st_len, deadline);
        if (rc == 0) rc = pf__send_all(c, w3.p, w3.n, deadline);
        if (rc == 0) rc = pf__send_all(c, input, input_len, deadline);
        while (rc == 0 && c->acked < c->crash_seq && !c->crash_rejected) {
            int ev = pf__poll(c, POLLIN, deadline);
            if (ev == 0) rc = PF_ETIMEDOUT;
            else if (ev < 0) rc = PF__BROKEN;
            else rc = pf__drain(c);
        }
        if (rc == PF__BROKEN && (c->acked >= c->crash_seq || c->crash_rejected)) {
            pf__ring_gc(c);
            pf__drop(c); /* answered, then the daemon went away: the next call reconnects */
            rc = 0;
        }
        if (rc == PF__BROKEN) { /* reconnect once; resend with the same id, a fresh seq */
            if ((rc = pf__recover(c, &reconnected)) != 0) break;
            continue;
        }
        if (rc == PF_ETIMEDOUT) {
            pf__err(c, "crash not acknowledged by the daemon in time", NULL, 0);
            if (c->acked < c->crash_seq) pf__fail(c); /* maybe half sent: drop the stream */
        } else if (c->crash_rejected) {
            rc = PF_EREJECTED;
        }
        break;
    }
    c->crash_seq = 0;
    pf__ring_gc(c);
    return pf__leave(c, rc, saved);
}

typedef struct pf__cov_args {
    int64_t edges, new_edges, exec_count;
} pf__cov_args;

static void pf__build_coverage(pf_client *c, pf__w *w, const void *arg) {
    const pf__cov_args *a = (const pf__cov_args *)arg;
    pf__event_head(c, w, 3, "coverage");
    pf__w_kint(w, "edges", a->edges);
    pf__w_kint(w, "new_edges", a->new_edges);
    pf__w_kint(w, "exec_count", a->exec_count);
    pf__w_finish(w, 0);
}

int pf_coverage(pf_client *c, int64_t edges, int64_t new_edges, int64_t exec_count) {
    int saved = errno, rc;
    pf__cov_args a;
    if (c == NULL) return PF_EINVAL;
    PF__ENTER(c, saved, rc);
    a.edges = edges;
    a.new_edges = new_edges;
    a.exec_count = exec_count;
    return pf__leave(c, pf__submit(c, pf__build_coverage, &a), saved);
}

typedef struct pf__corpus_args {
    const char *const *files;
    size_t nfiles;
    int64_t total_size;
} pf__corpus_args;

static void pf__build_corpus(pf_client *c, pf__w *w, const void *arg) {
    const pf__corpus_args *a = (const pf__corpus_args *)arg;
    size_t i;
    pf__event_head(c, w, 2, "corpus");
    pf__w_key(w, "files");
    if (a->nfiles < 16) pf__w_be(w, 0x90u | (unsigned)a->nfiles, 0, 0);
    else pf__w_be(w, 0xDC, a->nfiles, 2);
    for (i = 0; i < a->nfiles; i++) pf__w_text(w, a->files[i], (size_t)-1);
    pf__w_kint(w, "total_size", a->total_size);
    pf__w_finish(w, 0);
}

int pf_corpus(pf_client *c, const char *const *files, size_t nfiles, int64_t total_size) {
    int saved = errno, rc;
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
    PF__ENTER(c, saved, rc);
    a.files = files;
    a.nfiles = nfiles;
    a.total_size = total_size;
    return pf__leave(c, pf__submit(c, pf__build_corpus, &a), saved);
}

static void pf__build_stats(pf_client *c, pf__w *w, const void *arg) {
    const pf_stats_t *s = (const pf_stats_t *)arg;
    pf__event_head(c, w, 10, "stats");
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
    int saved = errno, rc;
    if (c == NULL || stats == NULL) return PF_EINVAL;
    PF__ENTER(c, saved, rc);
    return pf__leave(c, pf__submit(c, pf__build_stats, stats), saved);
}

typedef struct pf__life_args {
    const char *kind, *message;
} pf__life_args;

static void pf__build_lifecycle(pf_client *c, pf__w *w, const void *arg) {
    const pf__life_args *a = (const pf__life_args *)arg;
    pf__event_head(c, w, 1, a->kind);
    pf__w_key(w, "message");
    pf__w_text(w, a->message, PF__TEXT_MAX);
    pf__w_finish(w, 0);
}

int pf_lifecycle(pf_client *c, const char *kind, const char *message) {
    int saved = errno, rc;
    pf__life_args a;
    if (c == NULL) return PF_EINVAL;
    if (kind == NULL || (strcmp(kind, "started") && strcmp(kind, "stopped") &&
                         strcmp(kind, "error") && strcmp(kind, "timeout"))) {
        pf__err(c, "pf_lifecycle kind must be started, stopped, error or timeout", NULL, 0);
        return PF_EINVAL;
    }
    PF__ENTER(c, saved, rc);
    a.kind = kind;
    a.message = message;
    return pf__leave(c, pf__submit(c, pf__build_lifecycle, &a), saved);
}

int pf_flush(pf_client *c, int timeout_ms) {
    int saved = errno, rc, reconnected = 0;
    int64_t deadline;
    if (c == NULL) return PF_EINVAL;
    PF__ENTER(c, saved, rc);
    deadline = pf__now_ms() + (timeout_ms < 0 ? 0 : timeout_ms);
    for (;;) {
        rc = pf__drain(c);
        if (c->acked >= c->seq) { /* all answered, even if the daemon left right after */
            if (rc != 0) {
                pf__ring_gc(c);
                pf__drop(c);
            }
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
        if ((rc = pf__recover(c, &reconnected)) != 0) break; /* resends the ring */
    }
    pf__ring_gc(c);
    if (rc == 0 && c->unreported) {
        c->unreported = 0;
        rc = PF_EREJECTED;
    }
    return pf__leave(c, rc, saved);
}

void pf_close(pf_client *c) {
    int saved = errno;
    if (c == NULL) return;
    if (c->fd >= 0) close(c->fd); /* after fork: the child's own copy */
    c->fd = -1;
    c->ring_len = 0;
    c->ring_fresh = 0;
    c->retry_at_ms = INT64_MAX; /* closed: no more reconnecting */
    errno = saved;
}

int pf_is_connected(const pf_client *c) { return c != NULL && c->fd >= 0; }

const char *pf_last_error(const pf_client *c) { return c == NULL ? "" : c->errmsg; }

const char *pf_last_event_id(const pf_client *c) { return c == NULL ? "" : c->last_id; }

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
    default: return "unknown pfclient error";
    }
}

#ifdef __cplusplus
}
#endif
#endif /* PFCLIENT_IMPLEMENTED */
#endif /* PFCLIENT_IMPLEMENTATION */
