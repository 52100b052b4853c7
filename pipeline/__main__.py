"""`python -m pipeline <command> ...` is the same as `esft <command> ...`."""

import sys

from pipeline.cli import main

sys.exit(main())
