"""What the tests share, imported one way (``from helpers.X import ...``; pyproject.toml puts tests/ on
pytest's path): ``problems`` (random SNCA problems for the op tests), ``models`` (a forward-pass
oracle), ``data_folders`` (data sets in the applications' layouts), ``original_checkpoints`` (the
original project's checkpoint files)."""
