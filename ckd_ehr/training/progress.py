"""Progress lines' durations (time left, time taken), shared by training and scoring."""
from __future__ import annotations


def format_duration(seconds: float) -> str:
    """A short human duration for progress lines: '45 s', '3.2 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
