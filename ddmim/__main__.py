"""`python -m ddmim`: the `ddmim` command."""
import sys

from ddmim.cli import main

sys.exit(main())
