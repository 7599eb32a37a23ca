"""`python -m flows.cli`: the `ddpm` command."""

import sys

from flows.cli import main

sys.exit(main())
