"""Moved to decode/resume.py (mid-stream resume is the decode leg's logic); kept for old imports."""
from pdserve.decode.resume import StreamTracker, error_event  # noqa: F401
