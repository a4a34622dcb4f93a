"""A fake fuzzer that sends pfcollector a realistic mix through pfclient.

Like a real campaign: stats many times a second, coverage whenever edges grow, a corpus
update now and then, and a few crashes (with input bytes, some of them repeats of the same
crash). Run the daemon first (``pfcollector serve``), then::

    python examples/fake_fuzzer.py --seconds 5
    pfcollector status
"""

from __future__ import annotations

import argparse
import os
import random
import time

from pfclient import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to fuzz")
    parser.add_argument("--job", default="job-demo", help="job id")
    parser.add_argument("--fuzzer", default="fake-afl", help="fuzzer name")
    parser.add_argument("--socket", default=None, help="daemon socket (default: as pfcollector)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    sent = {"stats": 0, "coverage": 0, "corpus": 0, "crash": 0}
    edges, execs, corpus = 100, 0, []
    crash_inputs = [b"\xde\xad" + bytes([n]) * 64 for n in range(3)]
    deadline = time.monotonic() + args.seconds
    with Client(args.socket, job_id=args.job, fuzzer=args.fuzzer) as pf:
        pf.lifecycle("started", f"fake fuzzer pid {os.getpid()}")
        while time.monotonic() < deadline:
            execs += rng.randint(500, 1500)
            pf.stats(
                executions=execs,
                exec_per_second=float(rng.randint(4000, 9000)),
                total_edges=65536,
                covered_edges=edges,
                coverage_percent=100.0 * edges / 65536,
                corpus_size=len(corpus),
                unique_crashes=sent["crash"],
                cpu_usage=rng.uniform(90, 100),
                memory_usage=rng.randint(50, 60) * 1024 * 1024,
            )
            sent["stats"] += 1
            if rng.random() < 0.2:
                new = rng.randint(1, 5)
                edges += new
                pf.coverage(edges, new_edges=new, exec_count=execs)
                sent["coverage"] += 1
            if rng.random() < 0.02:
                name = f"queue/id:{len(corpus):06d},src:000000,op:havoc"
                corpus.append(name)
                pf.corpus([name], total_size=rng.randint(16, 4096))
                sent["corpus"] += 1
            if rng.random() < 0.002:
                data = rng.choice(crash_inputs)
                event_id = pf.crash(
                    "SEGV",
                    data,
                    signal=11,
                    stack_trace="#0 0x4005d0 in parse fake.c:42\n#1 0x400610 in main fake.c:80",
                )
                sent["crash"] += 1
                print(f"crash {event_id} is durable")
            time.sleep(0.001)
        pf.lifecycle("stopped", "done")
        pf.flush()
    print("sent:", ", ".join(f"{n} {kind}" for kind, n in sent.items()))


if __name__ == "__main__":
    main()
