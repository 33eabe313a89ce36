"""`python -m pycpt`: the pycpt command."""

import sys

from pycpt.cli import main

sys.exit(main())
