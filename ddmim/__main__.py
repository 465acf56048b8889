import sys

from ddmim.cli import main

sys.exit(main())
