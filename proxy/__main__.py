"""`python -m proxy run CONFIG` and the other `turnout` commands.

proxy.cli imports only the standard library up front, so a Python without Turnout's
dependencies gets one line naming the missing module and how to install it, not a traceback.
"""

from proxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
