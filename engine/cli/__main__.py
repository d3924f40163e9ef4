"""`python -m tunetop.cli`: what the `tunetop` script runs; engine and rank processes start this way."""

import os
import sys

from tunetop.cli import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
