"""loupe: the composition root. CLI, run-directory layout and wiring; no algorithms live here."""

__version__ = "0.1.0"
