"""`python -m ops`: the `processor` command line."""

import sys

from ops.launch import main

sys.exit(main())
