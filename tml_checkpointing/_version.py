"""The library's version, in a module of its own so that the CLI can name it without
importing the whole package (``tml --version``)."""

__version__ = "0.1.0"
