#!/usr/bin/env python3
"""Delete the cached pages that the queued rows name: run by hand, or by the daemon.

    python3 clear_cache.py --cache-dir DIR [CATEGORY/PORT ...]
    python3 clear_cache.py --check

See --help.  The code is the package cache_clearing (clearer.py, check.py).
"""

import sys

from cache_clearing.clearer import main

if __name__ == "__main__":
    sys.exit(main())
