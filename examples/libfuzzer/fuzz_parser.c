/* The libFuzzer harness for parser.c, reporting to pfcollector: the three pf_ lines are all
 * the wiring there is (see README.md). */
#define PFCLIENT_IMPLEMENTATION
#include "pf_libfuzzer.h"

#include "parser.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    pf_libfuzzer_begin(data, size);
    pfz_parse(data, size);
    pf_libfuzzer_end();
    return 0;
}
