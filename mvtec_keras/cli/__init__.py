"""Command-line scripts: they parse arguments and call the package; no logic of their own."""
