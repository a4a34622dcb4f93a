"""``python -m pfcollector``: the same as the ``pfcollector`` command."""

from .cli import main

main()
