"""The errors a command reports to its user as one line (exit code 2) instead of a traceback.

Kept apart from `microdit.cli` so that library modules do not import the command dispatcher.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls; printed as one line, exit code 2."""
