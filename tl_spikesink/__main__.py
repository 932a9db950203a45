"""`python -m tl_spikesink` runs the command line."""

import sys

from tl_spikesink.cli.commands import main

sys.exit(main())
