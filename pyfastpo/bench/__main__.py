"""``python -m pyfastpo.bench``: see :mod:`pyfastpo.bench.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
