"""Test-wide settings."""

import os

# a Ray API call before loupe.distributed.init_ray must fail here instead of quietly starting a
# default Ray (machine address, dashboard) that outlives the test
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
