#!/bin/sh
# Fuzz the daemon's decoder for a set time: fuzz/run.sh [SECONDS] [extra libFuzzer flags...]
# The working corpus and any crash artifacts go to $FUZZ_WORK (default /tmp/pfcollector-fuzz);
# the checked-in seeds (fuzz/seeds, made by fuzz/make_seeds.py) are read, never written.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
seconds=${1:-600}
[ $# -gt 0 ] && shift
work=${FUZZ_WORK:-/tmp/pfcollector-fuzz}
mkdir -p "$work/corpus" "$work/artifacts"
[ -d "$here/seeds" ] || "$python" "$here/make_seeds.py" "$here/seeds"
exec "$python" "$here/fuzz_protocol.py" -max_total_time="$seconds" -max_len=4096 \
    -timeout=10 -rss_limit_mb=2048 -dict="$here/protocol.dict" -dict="$here/protocol.dict" -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/" "$@" "$work/corpus" "$here/seeds"
