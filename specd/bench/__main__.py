"""`python -m specd.bench`: the same as `specd bench`."""

import sys

from specd.bench import main

sys.exit(main())
