"""``python -m pfcollector.devmaster --port 8080 --db FILE``: run the reference master."""

from ._server import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
