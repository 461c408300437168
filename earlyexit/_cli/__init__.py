"""Subcommands of the ``earlyexit`` command line (see :mod:`earlyexit.cli`)."""
