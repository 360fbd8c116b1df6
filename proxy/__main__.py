"""`python -m proxy run CONFIG` and the other `turnout` commands."""

from proxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
