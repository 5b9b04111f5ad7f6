import sys

from specd.cli.main import main

sys.exit(main())
