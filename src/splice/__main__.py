"""`python -m splice ...` runs the command line (also what `torchrun -m splice` starts)."""

import sys

from splice.cli.main import main

sys.exit(main())
