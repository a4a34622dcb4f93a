/* A tiny parser for the "PFZ" record format, with a planted bug (the fuzz target). */
#ifndef PFZ_PARSER_H
#define PFZ_PARSER_H
#include <stddef.h>
#include <stdint.h>

/* Parses "PFZ" <version> then records <type> <len> <payload[len]>; returns the record count,
 * or -1 for a malformed input. Crashes (NULL write) on an 'X' record of a version-2 file. */
int pfz_parse(const uint8_t *data, size_t size);

#endif
