"""The package version, in one place (setup.cfg reads it from here without importing torch)."""

__version__ = "0.2.0"
