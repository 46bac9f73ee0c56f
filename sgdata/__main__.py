"""`python -m sgdata ...` runs the `sgdata` command line."""

from sgdata.cli import main

main()
