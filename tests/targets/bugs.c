/* Small buggy target for pfcollector's report parser fixtures and `watch afl --reproduce`.
 *
 * Reads its input from the file named by argv[1], or stdin. The first byte picks a bug;
 * any other input returns 0. Built with clang -fsanitize=address,undefined (see build.sh).
 */
#include <assert.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int global_table[8];

__attribute__((noinline)) static int read_past_heap(const unsigned char *data, size_t size) {
    int *table = malloc(4 * sizeof(int));
    memset(table, 0, 4 * sizeof(int));
    int value = table[4 + (size > 100)]; /* heap-buffer-overflow READ 4 */
    free(table);
    return value + (int)data[0];
}

__attribute__((noinline)) static void write_past_stack(const unsigned char *data, size_t size) {
    char buffer[8];
    memcpy(buffer, data, size > 16 ? 16 : size); /* stack-buffer-overflow WRITE */
    printf("%c\n", buffer[0]);
}

__attribute__((noinline)) static int read_past_global(size_t size) {
    const int *table = global_table; /* through a pointer: UBSan's bounds check stays out */
    return table[8 + (size > 100)]; /* global-buffer-overflow READ 4 */
}

__attribute__((noinline)) static int use_after_free(void) {
    char *p = malloc(16);
    p[0] = 'a';
    free(p);
    return p[1]; /* heap-use-after-free READ 1 */
}

__attribute__((noinline)) static void free_twice(void) {
    char *p = malloc(16);
    free(p);
    free(p); /* attempting double-free */
}

__attribute__((noinline)) static int null_deref(const unsigned char *data) {
    volatile int *p = (int *)(size_t)(data[1] == 'z' ? 1 : 0);
    return *p; /* SEGV on unknown address */
}

__attribute__((noinline)) static int recurse(int depth) {
    volatile char pad[256];
    pad[0] = (char)depth;
    return recurse(depth + 1) + pad[0]; /* stack-overflow */
}

__attribute__((noinline)) static int overflow_int(const unsigned char *data) {
    int big = INT_MAX - 1 + (data[0] == 'i');
    return big + 1; /* UBSan: signed integer overflow */
}

__attribute__((noinline)) static void check_magic(const unsigned char *data) {
    assert(data[1] == 'M'); /* assertion failure: abort() */
}

__attribute__((noinline)) static void leak(void) {
    static char *keep;
    keep = malloc(64);
    keep = 0; /* LeakSanitizer: detected memory leaks */
}

__attribute__((noinline)) static void give_up(void) {
    abort(); /* a plain abort(): libFuzzer's "deadly signal" */
}

static int dispatch(const unsigned char *data, size_t size) {
    if (size < 2) return 0;
    switch (data[0]) {
    case 'h': return read_past_heap(data, size);
    case 's': write_past_stack(data, size); return 0;
    case 'g': return read_past_global(size);
    case 'u': return use_after_free();
    case 'd': free_twice(); return 0;
    case 'n': return null_deref(data);
    case 'r': return recurse(0);
    case 'i': return overflow_int(data);
    case 'a': check_magic(data); return 0;
    case 'l': leak(); return 0;
    case 'b': give_up(); return 0;
    default: return 0;
    }
}

#ifdef FUZZER
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    if (size >= 2 && data[0] == 't') for (;;) {} /* libFuzzer: timeout */
    if (size >= 2 && data[0] == 'o') { /* libFuzzer: out-of-memory (malloc limit) */
        volatile char *big = malloc((size_t)3 << 30);
        if (big) big[0] = 1;
        return 0;
    }
    if (size >= 2 && data[0] == 'k') { /* libFuzzer: deadly signal (SIGKILL-free raise) */
        volatile int *p = 0;
        *p = 1;
    }
    dispatch(data, size);
    return 0;
}
#else
int main(int argc, char **argv) {
    static unsigned char data[4096];
    FILE *in = argc > 1 ? fopen(argv[1], "rb") : stdin;
    if (!in) return 2;
    size_t size = fread(data, 1, sizeof data, in);
    if (in != stdin) fclose(in);
    return dispatch(data, size) == 12345;
}
#endif
