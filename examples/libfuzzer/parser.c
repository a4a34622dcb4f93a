#include "parser.h"

#include <string.h>

struct pfz_counter {
    const char *name;
    int count;
};

static struct pfz_counter counters[] = {{"A", 0}, {"B", 0}, {"W", 0}};
/* volatile: otherwise the optimizer, knowing NULL is never dereferenced, may assume lookup()
 * always finds a match and drop its bounds check (a global-buffer-overflow instead of SEGV). */
static struct pfz_counter *volatile not_found = NULL;

static struct pfz_counter *lookup(uint8_t type) {
    size_t i;
    for (i = 0; i < sizeof counters / sizeof counters[0]; i++)
        if (counters[i].name[0] == (char)type) return &counters[i];
    return not_found; /* the bug: callers assume every type has a counter */
}

int pfz_parse(const uint8_t *data, size_t size) {
    size_t at = 4;
    int records = 0;
    if (size < 4 || memcmp(data, "PFZ", 3) != 0) return -1;
    while (at + 2 <= size) {
        uint8_t type = data[at], len = data[at + 1];
        if (at + 2 + len > size) return -1;
        if (type == 'A' || type == 'B' || type == 'W') {
            lookup(type)->count++;
        } else if (type == 'X' && data[3] == '2') {
            lookup(type)->count += len; /* NULL->count: SEGV */
        } else {
            return -1;
        }
        at += 2 + (size_t)len;
        records++;
    }
    return records;
}
