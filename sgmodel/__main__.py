"""`python -m sgmodel` is the `sgmodel` command."""

import sys

from sgmodel.cli import main

sys.exit(main())
