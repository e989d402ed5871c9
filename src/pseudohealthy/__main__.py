"""`python -m pseudohealthy`."""

import sys

from pseudohealthy.cli import main

sys.exit(main())
