#!/usr/bin/env python3
"""Wait for NOTIFY clear_ports_cache and run clear_cache.py when rows are due.

    python3 listen_clear_cache.py --cache-dir DIR

See --help.  The code is the package cache_clearing (daemon.py).
"""

import sys

from cache_clearing.daemon import main

if __name__ == "__main__":
    sys.exit(main())
