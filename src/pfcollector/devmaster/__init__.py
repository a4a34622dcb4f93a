"""A reference PandaFuzz master: a real HTTP server on 127.0.0.1, with fault injection.

It answers like the PandaFuzz master (``shared/pandafuzz-master-api.md``, checked against the
master's Go handlers) and stores into SQLite, so integration tests, the chaos suite, the
benchmarks and ``pfcollector dev-master`` run against the same behaviour:

* ``POST /api/v1/results/crash|coverage|corpus``: lenient (unknown fields ignored, any
  Content-Type); ``job_id``/``bot_id`` required (400), Go typing (``11.0`` for an int is 400),
  RFC 3339 timestamps (400), ``files`` null or missing is 500; limits 10 MiB for a crash,
  100 MiB for corpus, 1 MiB otherwise (413); ``Content-Encoding: gzip`` is 400
  (``DevMaster(accept_compression=True)`` decodes gzip and zstd bodies instead).
* ``POST /api/v1/results/status``: any JSON object, kept in ``status_posts``.
* ``POST /api/v1/results/batch``: strict (unknown field anywhere 400, Content-Type exactly
  ``application/json`` else 415); a store failure answers 200 with ``errors`` such as
  ``"corpus 0: NOT NULL constraint failed: corpus_updates.files"`` and ``partial_success``.
* ``POST /api/v1/bots/register`` (strict, 201 sent as text/plain) and
  ``POST /api/v1/bots/{id}/heartbeat`` (200 or 404); ``GET /health``.
* Writes are ``INSERT OR REPLACE`` by id; ``submissions`` counts stores per id.
* ``DevMaster(cost_per_item=0.00023)`` (``--cost-per-item``) makes each stored result cost
  that many seconds, writes serialised: about what the PandaFuzz master costs per crash in a
  batch, so benchmarks meet a master as slow as the real one.

Faults (:class:`Faults`) are driven from Python or over HTTP: ``POST /_dev/<method>`` with the
method's arguments as a JSON object (``/_dev/fail_next {"n": 2, "status": 503,
"retry_after": 1}``, ``/_dev/down_for {"seconds": 1.5}``, ``/_dev/slow``, ``/_dev/reject_ids``,
``/_dev/partial_fail_ids``, ``/_dev/reset_next``, ``/_dev/clear``, ``/_dev/down``), and
``GET /_dev/stats`` (counts, submissions, requests seen, largest result body) or
``GET /_dev/rows?kind=crash``.

Example:
    >>> with DevMaster() as master:  # doctest: +SKIP
    ...     master.faults.fail_next(2, status=503, retry_after=0.1)
    ...     run_the_collector(master.url)
    ...     assert master.count("crash") == 10
"""

from ._faults import Faults
from ._server import DevMaster, main, serve

__all__ = ["DevMaster", "Faults", "main", "serve"]
