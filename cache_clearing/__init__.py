"""The code behind clear_cache.py and listen_clear_cache.py; docs/design.md maps its modules."""

__version__ = "1.0.0"    # the one version of both commands (pyproject.toml reads it)
