"""The command lines: `specd` (specd.cli.main) and `specctl` (specd.cli.specctl)."""
