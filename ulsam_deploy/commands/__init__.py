"""CLI command functions; cli.py registers them on the Typer app."""
