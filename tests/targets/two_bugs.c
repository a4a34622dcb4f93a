/* Two bugs behind many paths, for the end-to-end test of `watch afl --reproduce`.
 *
 * An input starting with 'H' reads past a heap block, one starting with 'U' reads freed
 * memory; the second byte picks one of several branches first, so AFL++ saves several crash
 * files (new paths) for each bug, which the daemon must count as hits of two bugs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noinline)) static int past_the_end(const unsigned char *data) {
    int *table = calloc(4, sizeof(int));
    int at = 4;
    switch (data[1] & 7) {
    case 0: at += 1; break;
    case 1: at += 2; break;
    case 2: at += 3; break;
    case 3: at += 4; break;
    default: break;
    }
    int value = table[at]; /* heap-buffer-overflow READ 4 */
    free(table);
    return value;
}

__attribute__((noinline)) static int after_free(const unsigned char *data) {
    char *p = malloc(32);
    memset(p, data[1], 32);
    free(p);
    switch (data[1] & 3) {
    case 0: return p[1]; /* heap-use-after-free READ 1 */
    case 1: return p[2];
    case 2: return p[3];
    default: return p[4];
    }
}

int main(int argc, char **argv) {
    unsigned char data[64] = {0};
    FILE *in = argc > 1 ? fopen(argv[1], "rb") : stdin;
    if (!in) return 2;
    size_t size = fread(data, 1, sizeof data, in);
    if (in != stdin) fclose(in);
    if (size < 2) return 0;
    if (data[0] == 'H') return past_the_end(data);
    if (data[0] == 'U') return after_free(data);
    return 0;
}
