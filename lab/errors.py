"""The one error the lab raises for what the machine lacks or refuses."""
from __future__ import annotations


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message names the problem and its fix."""
