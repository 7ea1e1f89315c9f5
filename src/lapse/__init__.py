"""lapse: session timeout enforcement in front of any app."""

__version__ = "0.1.0"
