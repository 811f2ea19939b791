"""`python -m ops`: the `processor` command line."""

import sys

from ops.cli import main

sys.exit(main())
