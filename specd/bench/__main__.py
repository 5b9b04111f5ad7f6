"""`python -m specd.bench`: the same as `specd bench`."""

import sys

from specd.core.defaults import keep_local_ray_on_loopback, quiet_idle_threads

quiet_idle_threads()  # before torch is imported
keep_local_ray_on_loopback()  # before ray is imported

from specd.bench import main  # noqa: E402

sys.exit(main())
