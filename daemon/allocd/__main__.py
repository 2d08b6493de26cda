"""`python -m allocd ...` is `allocd ...`."""

import sys

from allocd.cli import main

sys.exit(main())
