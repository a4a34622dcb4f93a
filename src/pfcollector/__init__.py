"""pfcollector: the local result collector of a PandaFuzz fuzzing bot.

Fuzzers send events over a Unix socket (see ``docs/protocol.md``); the daemon keeps them in a
durable spool and delivers them to the PandaFuzz master in batches. The modules, in the order
data flows: :mod:`~pfcollector.protocol`, :mod:`~pfcollector.server`, :mod:`~pfcollector.ingest`,
:mod:`~pfcollector.spool`, :mod:`~pfcollector.pipeline`, :mod:`~pfcollector.sender`
(with :mod:`~pfcollector.master` and :mod:`~pfcollector.breaker`); :mod:`~pfcollector.daemon`
composes them and :mod:`~pfcollector.cli` is the command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pfcollector")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
