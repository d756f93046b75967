"""``python -m pyfastpo.preference_data``: see :mod:`pyfastpo.preference_data.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
