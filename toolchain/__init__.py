"""Mobile face-verification toolchain: train, enroll, quantize, export, profile, check."""

__version__ = "0.1.0"
