/* MemorySanitizer fixture: a branch on an uninitialised value. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) static int decide(const int *values, int n) {
    return values[n] > 3; /* use-of-uninitialized-value */
}

int main(int argc, char **argv) {
    int *values = malloc(8 * sizeof(int));
    values[0] = argc;
    if (decide(values, argc)) puts("big");
    free(values);
    return 0;
}
