"""What every example's command line shares (no torch import: also for the scripts that only launch others)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``argparse.ArgumentDefaultsHelpFormatter`` that appends ``(default: X)`` only to help texts that do not already
    say what the default is (``(default: ...`` written by hand, e.g. for a ``None`` that means "chosen later")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)
