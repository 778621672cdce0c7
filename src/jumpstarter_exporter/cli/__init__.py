"""Command-line interface: click commands only. Each parses, calls one function of a part
below, and maps errors to exit codes (``errors.ExitCode``). Nothing imports ``cli``."""
