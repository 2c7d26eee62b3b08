"""`python -m loupe.cli ...` runs the `loupe` command."""

import sys

from loupe.cli import main

sys.exit(main())
