"""`python -m dit_distillery <command>` (also `accelerate launch -m dit_distillery train JOB.json`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
