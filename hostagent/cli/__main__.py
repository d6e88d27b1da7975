"""`python -m hostagent.cli` runs the command line."""

import sys

from hostagent.cli.main import main

sys.exit(main())
