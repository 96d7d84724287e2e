"""ml-collections configs: `get_config(arg)` per file."""
