"""`python -m phi3local ...`: the same command line as `phi3local ...` (and what launchers such as
`torchrun -m phi3local` run)."""

import sys

from phi3local.cli import main

sys.exit(main())
