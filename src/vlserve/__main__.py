"""`python -m vlserve` is `vlserve`."""

import sys

from vlserve.cli import main

sys.exit(main())
