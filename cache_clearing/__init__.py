"""listen_clear_cache: PostgreSQL says which cached pages went stale; these delete them.

The two commands are the scripts clear_cache.py and listen_clear_cache.py.
The modules, each importing only those listed before it:

  errors     the errors the commands exit on, said in one line
  templates  page templates and command arguments, expanded into targets
  config     options, environment and --config, read into one immutable Config
  pages      the cache directory: safe deletion, and the queues' commands
  queues     the SQL: key columns, due rows, the queue update
  check      --check, the Nagios plugin
  clearer    one clearing run, by hand or for the daemon, and its waiting clearer
  daemon     the LISTEN loop, its scheduler and its clearer processes
"""

__version__ = "1.0.0"    # the one version of both commands (pyproject.toml reads it)
