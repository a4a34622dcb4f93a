#!/bin/sh
# Builds the example fuzzer: ./build.sh [OUTPUT]   (default ./fuzz_parser)
# CC (default clang) must support -fsanitize=fuzzer,address (Debian: apt-get install clang).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/fuzz_parser}
${CC:-clang} -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address \
    -Wall -Wextra -Werror \
    -I"$here/../../clients/c" -I"$here" \
    "$here/fuzz_parser.c" "$here/parser.c" -o "$out" \
    -Wl,--wrap=__sanitizer_cov_8bit_counters_init
echo "built $out"
