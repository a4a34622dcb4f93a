"""Chaos suite: the delivery promise under master faults, ``kill -9`` and rude clients.

One command, time-bounded::

    python benchmarks/chaos.py                # about 2 minutes of chaos, 8 producers
    python benchmarks/chaos.py --quick        # about 15 s, for CI (tests/test_chaos.py)
    python benchmarks/chaos.py --seed 42 --json out.json

A reference master (:class:`~pfcollector.devmaster.DevMaster`) runs in this process; the daemon
and the producers are subprocesses. While the producers send a mix of crashes (waited for) and
coverage/corpus/stats (then ``flush()``), this script injects, in a seeded random order:

* ``down``: the master refuses connections for a while (``down_for``);
* ``timeout``: the master answers later than the daemon's HTTP timeout (``slow``);
* ``503``: a burst of 503 with ``Retry-After`` (``fail_next``);
* ``reset``: the master resets the connection mid-body (``reset_next``);
* ``kill9``: SIGKILL of the daemon, then a restart;

all the time: a saboteur opens connections and sends half a frame (or a bad length) and closes;
and for the whole run: one job's items with chosen ids are refused with 400 (``reject_ids``) and
another job's items with chosen ids fail to store (``partial_fail_ids``, batches answer
``partial_success``). Those are the only events that may become dead letters.

At the end the daemon is restarted once more and left to empty its spool. The summary counts
acknowledged ids (a producer saw the ack: a crash id returned, or a later ``flush()``
returned), delivered, dead-lettered, **lost** (acknowledged, neither at the master nor a dead
letter: must be 0), **duplicates** at the master by id (must be 0), wrongly dead-lettered (a
dead letter that was not poisoned on purpose: must be 0), and the redundant resends the master
saw (``DevMaster.submissions``: allowed, the master overwrites by id). Exit code 1 if a must
fails.

Two settings of the daemon cannot be given to ``pfcollector serve`` (there is no
``--http-timeout`` and no ``--coalesce`` flag), so the daemon is started with
``python -c`` around :func:`pfcollector.daemon.run_daemon` and a :class:`Config`. Coverage and
stats are coalesced by default (acknowledged as accepted, not durable, and merged between
flushes): they are then counted apart, and only crash and corpus ids must all arrive;
``--no-coalesce`` makes every kind durable and checked.

Producers get predictable ids (``<job>.<n>``) so that the poisoned ids can be chosen before
they exist; everything else in a producer is the real ``pfclient``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

#: Every id n of a poisoned job with n % POISON_EVERY == POISON_AT is poisoned.
POISON_EVERY = 13
POISON_AT = 5
#: Ids per job registered as poison up front (producers never get that far in a run).
POISON_HORIZON = 200_000
REJECT_JOB, PARTIAL_JOB = "job-0", "job-1"
WAIT_LIMIT = 60.0

_LAUNCH = (
    "import json, logging, sys, trio\n"
    "from pfcollector.config import Config\n"
    "from pfcollector.daemon import run_daemon\n"
    "logging.basicConfig(level=logging.WARNING, "
    "format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "logging.getLogger('httpx').setLevel(logging.WARNING)\n"
    "trio.run(run_daemon, Config(**json.loads(sys.argv[1])))\n"
)


# -- the producer (a subprocess: python chaos.py --client ...) ------------------------------


def run_client(sock: str, out: str, stop: str, seed: int, job: str) -> int:
    """Send a mix until ``stop`` exists; write ``kind id`` per acknowledged id to ``out``."""
    import pfclient
    import pfclient._client as client_module

    counter = iter(range(10**9))

    class _Ids:  # predictable ids, so the driver can poison some before they exist
        @staticmethod
        def uuid4() -> str:
            return f"{job}.{next(counter)}"

    client_module.uuid = _Ids  # type: ignore[assignment]
    rng = random.Random(seed)
    client: pfclient.Client | None = None
    pending: list[tuple[str, str]] = []
    stopping, retries = False, 0
    with open(out, "a", buffering=1) as log:

        def drop() -> None:
            nonlocal client
            if client is not None:
                client.timeout = 1.0  # close() flushes briefly; those acks are not counted
                client.close()
                client = None

        while True:
            stopping = stopping or os.path.exists(stop)
            try:
                if client is None:
                    client = pfclient.Client(sock, job_id=job, fuzzer="chaos", timeout=5)
                if stopping:
                    client.flush()
                    log.writelines(f"{k} {i}\n" for k, i in pending)
                    break
                r = rng.random()
                if r < 0.25:
                    data = f"{job}-{rng.getrandbits(64)}-".encode() + rng.randbytes(64)
                    event_id = client.crash("SEGV", data, signal=11, stack_trace="#0 f")
                    log.write(f"crash {event_id}\n")
                elif r < 0.5:
                    pending.append(("coverage", client.coverage(rng.randint(1, 10**6))))
                elif r < 0.75:
                    files = [f"queue/{job}-{rng.getrandbits(64):x}"]
                    pending.append(("corpus", client.corpus(files, total_size=10)))
                else:
                    pending.append(("stats", client.stats(executions=rng.randint(0, 10**9))))
                if len(pending) >= rng.randint(1, 30):
                    client.flush()
                    log.writelines(f"{k} {i}\n" for k, i in pending)
                    pending.clear()
            except pfclient.PfClientError:
                pending.clear()  # their acks were not seen: they do not count
                drop()
                retries += 1
                if stopping and retries > 300:
                    break
                time.sleep(0.05 + rng.random() * 0.2)
        drop()
        log.write("done\n")
    return 0


# -- the daemon ------------------------------------------------------------------------------


class Daemon:
    """The daemon as a subprocess that can be SIGKILLed and restarted."""

    def __init__(self, config: dict[str, Any], log: Path) -> None:
        from pfcollector.config import Config

        known = {f.name for f in dataclasses.fields(Config)}
        self.dropped_keys = sorted(set(config) - known)
        self.config = {k: v for k, v in config.items() if k in known}
        self.socket_path = Path(self.config["socket_path"])
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.died = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, json.dumps(self.config)], stdout=log, stderr=log
            )
        self.starts += 1
        deadline = time.monotonic() + WAIT_LIMIT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(Exception):
                if self.request("status", timeout=2).get("pid") == self.proc.pid:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready in {WAIT_LIMIT}s; see {self.log}")
            time.sleep(0.05)

    def request(self, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        from pfcollector.control import request

        return request(self.socket_path, op, args, timeout=timeout)

    def revive(self) -> bool:
        """Restart the daemon if it exited on its own (a bug); True if it had."""
        if self.proc is None or self.proc.poll() is None:
            return False
        self.died += 1
        self.proc = None
        self.start()
        return True

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=WAIT_LIMIT)
            self.proc = None

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WAIT_LIMIT)
        finally:
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=WAIT_LIMIT)
            self.proc = None

    def wait_empty(self) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_LIMIT
        while True:
            status = self.request("status")
            pipeline = (status.get("delivery") or {}).get("pipeline") or {}
            coalescing = ((status.get("policies") or {}).get("coalesce") or {}).get("pending", 0)
            if status["spool"]["events"] == 0 and not pipeline.get("held") and not coalescing:
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"spool not empty after {WAIT_LIMIT}s: {status['spool']}")
            time.sleep(0.1)


# -- the rude client -------------------------------------------------------------------------


class Saboteur(threading.Thread):
    """Connects, sends part of a frame (or a bad length, or nothing), and hangs up; repeatedly."""

    def __init__(self, socket_path: Path, seed: int) -> None:
        super().__init__(name="saboteur", daemon=True)
        self.socket_path = socket_path
        self.rng = random.Random(seed)
        self.stopping = threading.Event()
        self.sent: Counter[str] = Counter()

    def run(self) -> None:
        from pfcollector.events import Kind
        from pfcollector.protocol import EventMsg, Hello, encode

        hello = encode(Hello(1, "saboteur", "chaos", os.getpid()))
        n = 0
        while not self.stopping.wait(self.rng.uniform(0.02, 0.15)):
            n += 1
            event = encode(
                EventMsg(1, Kind.CRASH, {"type": "X", "input": self.rng.randbytes(200)}, f"sab.{n}")
            )
            how = self.rng.choice(("half_event", "half_header", "half_hello", "huge", "nothing"))
            payload = {
                "half_event": hello + event[: self.rng.randint(1, len(event) - 1)],
                "half_header": hello + event[: self.rng.randint(1, 3)],
                "half_hello": hello[: self.rng.randint(1, len(hello) - 1)],
                "huge": hello + struct.pack(">I", 0xFFFFFFF0) + b"\x81",
                "nothing": b"",
            }[how]
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(1.0)
                    sock.connect(str(self.socket_path))
                    sock.sendall(payload)
                self.sent[how] += 1
            except OSError:
                self.sent["refused"] += 1  # the daemon is down (kill9) or busy

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=WAIT_LIMIT)


# -- the run ---------------------------------------------------------------------------------


def poisoned(job: str) -> list[str]:
    return [f"{job}.{n}" for n in range(POISON_AT, POISON_HORIZON, POISON_EVERY)]


def read_acked(paths: list[Path]) -> tuple[dict[str, str], int]:
    acked: dict[str, str] = {}
    done = 0
    for path in paths:
        for line in path.read_text().splitlines():
            if line == "done":
                done += 1
            else:
                kind, event_id = line.split()
                acked[event_id] = kind
    return acked, done


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pfcollector.devmaster import DevMaster

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="pfchaos"))
    http_timeout = 1.0
    config = {
        "socket_path": str(work / "pf.sock"),
        "data_dir": str(work / "data"),
        "bot_id": "bot-chaos",
        "flush_interval": 0.1,
        "batch_size": 50,
        "retry_base": 0.05,
        "retry_cap": 1.0,
        "breaker_reset": 0.2,
        "breaker_max_reset": 1.0,
        "drain_deadline": 2.0,
        "http_timeout": http_timeout,
        "heartbeat_interval": 3600.0,
    }
    if args.coalesce is not None:
        config["coalesce"] = args.coalesce
    faults_done: Counter[str] = Counter()
    stop = work / "stop"
    outs = [work / f"acked-{i}.txt" for i in range(args.clients)]
    clients: list[subprocess.Popen[bytes]] = []
    master = DevMaster().start()
    daemon = Daemon({**config, "master_url": master.url}, work / "daemon.log")
    saboteur = Saboteur(daemon.socket_path, rng.getrandbits(32))
    started = time.monotonic()
    try:
        master.faults.reject_ids(poisoned(REJECT_JOB), status=400)
        master.faults.partial_fail_ids(poisoned(PARTIAL_JOB))
        daemon.start()
        for i, out in enumerate(outs):
            argv = [
                sys.executable,
                __file__,
                "--client",
                str(daemon.socket_path),
                str(out),
                str(stop),
                str(rng.getrandbits(32)),
                f"job-{i}",
            ]
            # The daemon's outbox: a fail-open crash with no daemon is kept there (a producer
            # that never saw a welcome would otherwise use the default data dir's).
            env = {**os.environ, "PFCOLLECTOR_OUTBOX": str(work / "data" / "outbox")}
            clients.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env))
        saboteur.start()
        deadline = started + args.seconds
        schedule = ["down", "timeout", "503", "reset", "kill9"]
        while time.monotonic() < deadline:
            rng.shuffle(schedule)
            for fault in schedule:
                if time.monotonic() >= deadline:
                    break
                daemon.revive()
                if fault == "down":
                    master.faults.down_for(rng.uniform(0.5, 1.5))
                elif fault == "timeout":
                    master.faults.slow(http_timeout + 0.5, n=rng.randint(1, 3))
                elif fault == "503":
                    master.faults.fail_next(rng.randint(3, 10), status=503, retry_after=0.2)
                elif fault == "reset":
                    master.faults.reset_next(rng.randint(1, 4))
                else:
                    daemon.kill9()
                    time.sleep(rng.uniform(0.0, 0.3))
                    daemon.start()
                faults_done[fault] += 1
                time.sleep(rng.uniform(0.4, 1.5))
        # Calm down: no more transient faults (the poison stays, as a real bad payload would).
        master.faults.fail_next(0)
        master.faults.slow(0.0)
        master.faults.reset_next(0)
        master.faults.up()
        daemon.revive()
        stop.touch()
        for proc in clients:
            proc.wait(timeout=WAIT_LIMIT)
        saboteur.stop()
        daemon.revive()
        acked, done = read_acked(outs)
        daemon.kill9()  # one last kill with acknowledged events still on their way
        faults_done["kill9"] += 1
        daemon.start()
        final = daemon.wait_empty()
        dead_rows = daemon.request("dead_letters", {"limit": 10**7})
        exit_code = daemon.terminate()
        return summarize(
            args,
            master,
            acked,
            done,
            dead_rows,
            final,
            exit_code,
            {
                "faults": dict(faults_done),
                "saboteur": dict(saboteur.sent),
                "daemon_starts": daemon.starts,
                "daemon_died": daemon.died,
                "seconds": round(time.monotonic() - started, 1),
                "config_keys_not_supported": daemon.dropped_keys,
            },
        )
    finally:
        stop.touch()
        saboteur.stop()
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=WAIT_LIMIT)
        daemon.close()
        master.stop()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def summarize(
    args: argparse.Namespace,
    master: Any,
    acked: dict[str, str],
    done: int,
    dead_rows: list[dict[str, Any]],
    final: dict[str, Any],
    exit_code: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    coalesce = (final.get("policies") or {}).get("coalesce") or {}
    coalesced = set(coalesce.get("kinds") or ()) if coalesce.get("enabled") else set()
    at_master: dict[str, Counter[str]] = {
        kind: Counter(str(row["id"]) for row in master.rows(kind))
        for kind in ("crash", "coverage", "corpus")
    }
    at_master["stats"] = Counter(str(row["body"].get("id")) for row in master.rows("status"))
    dead = {str(row["id"]) for row in dead_rows}
    poison = set(poisoned(REJECT_JOB)) | set(poisoned(PARTIAL_JOB))
    per_kind: dict[str, dict[str, int]] = {}
    lost: list[str] = []
    wrongly_dead = sorted(dead - poison)
    poison_delivered: list[str] = []
    for kind in ("crash", "corpus", "coverage", "stats"):
        ids = {i for i, k in acked.items() if k == kind}
        delivered = {i for i in ids if i in at_master[kind]}
        dead_here = ids & dead
        missing = ids - delivered - dead_here
        poison_delivered += sorted(delivered & poison) if kind != "stats" else []
        if kind not in coalesced:
            lost += sorted(missing)
        per_kind[kind] = {
            "acknowledged": len(ids),
            "delivered": len(delivered),
            "dead_lettered": len(dead_here),
            "not_at_master": len(missing),
            "coalesced": kind in coalesced,
        }
    # By id, a table holds one row per id; status posts are append-only (at least once).
    duplicates = sum(
        n - 1 for kind in ("crash", "coverage", "corpus") for n in at_master[kind].values() if n > 1
    )
    submissions = master.submissions()
    totals = {
        "acknowledged": len(acked),
        "delivered": sum(v["delivered"] for v in per_kind.values()),
        "dead_lettered": sum(v["dead_lettered"] for v in per_kind.values()),
        "lost": len(lost),
        "duplicates_at_master": duplicates,
        "wrongly_dead_lettered": len(wrongly_dead),
        "poison_delivered": len(poison_delivered),
        "redundant_resends": sum(n - 1 for n in submissions.values() if n > 1),
        "status_duplicate_rows": sum(n - 1 for n in at_master["stats"].values() if n > 1),
        "coalesced_away": sum(v["not_at_master"] for v in per_kind.values() if v["coalesced"]),
    }
    ok = (
        not lost
        and not duplicates
        and not wrongly_dead
        and not poison_delivered
        and exit_code == 0
        and done == args.clients
        and not extra["daemon_died"]
        and per_kind["crash"]["acknowledged"] > 0
    )
    return {
        "ok": ok,
        "seed": args.seed,
        "quick": args.quick,
        "clients": args.clients,
        "clients_finished": done,
        "daemon_exit_code": exit_code,
        "totals": totals,
        "per_kind": per_kind,
        "examples": {
            "lost": lost[:10],
            "wrongly_dead_lettered": wrongly_dead[:10],
            "poison_delivered": poison_delivered[:10],
        },
        "daemon_errors_last_run": final.get("errors", {}),
        **extra,
    }


def print_summary(result: dict[str, Any]) -> None:
    t = result["totals"]
    print(
        f"chaos seed {result['seed']}: {result['seconds']} s, {result['clients']} producers, "
        f"{result['daemon_starts']} daemon starts, DIED ON ITS OWN {result['daemon_died']}"
    )
    print(f"faults: {result['faults']}   saboteur: {result['saboteur']}")
    print(f"{'kind':<10}{'acked':>8}{'delivered':>11}{'dead':>7}{'absent':>8}  note")
    for kind, v in result["per_kind"].items():
        note = "coalesced (acked = accepted, may merge)" if v["coalesced"] else "must arrive"
        print(
            f"{kind:<10}{v['acknowledged']:>8}{v['delivered']:>11}{v['dead_lettered']:>7}"
            f"{v['not_at_master']:>8}  {note}"
        )
    print(
        f"acknowledged {t['acknowledged']}, delivered {t['delivered']}, dead-lettered "
        f"{t['dead_lettered']}, LOST {t['lost']}, DUPLICATES {t['duplicates_at_master']}, "
        f"wrongly dead-lettered {t['wrongly_dead_lettered']}, poison delivered "
        f"{t['poison_delivered']}"
    )
    print(
        f"redundant resends seen by the master {t['redundant_resends']}, duplicate status rows "
        f"{t['status_duplicate_rows']}, daemon exit code {result['daemon_exit_code']}"
    )
    print("OK" if result["ok"] else "FAILED")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        sock, out, stop, seed, job = argv[1:6]
        return run_client(sock, out, stop, int(seed), job)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 15 s (CI)")
    parser.add_argument("--seconds", type=float, default=None, help="chaos time (default 120)")
    parser.add_argument("--clients", type=int, default=None, help="producers (default 8)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument(
        "--coalesce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="daemon coalescing of coverage/stats (default: the daemon's)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 15.0 if args.quick else 120.0
    if args.clients is None:
        args.clients = 6 if args.quick else 8
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    print(f"chaos seed {args.seed} (replay with --seed {args.seed})", flush=True)
    result = run(args)
    print_summary(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
