"""``python -m cdg ...``: the same command line as the ``cdg`` script."""

from cdg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
