"""The command lines: `specd` (specd.cli.main) and `specctl` (specd.cli.specctl)."""

from specd.cli.main import main

__all__ = ["main"]
