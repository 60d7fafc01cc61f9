"""Built-in plugins, installed under the import name ``engine_plugins``; one module per plugin."""
