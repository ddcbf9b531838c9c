"""CLI command functions and their shared option types; cli.py registers them on the Typer app."""
