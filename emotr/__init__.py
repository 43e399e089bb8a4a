"""emotr: image emotion recognition (negative vs positive) by transfer learning."""

__version__ = "0.1.0"
