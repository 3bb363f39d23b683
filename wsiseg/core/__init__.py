"""The package's base: errors and exit codes, atomic writes, process settings."""
