"""Calibration sets and post-training static int8 quantisation."""

from toolchain.quantize.calibration import build_calibration_set, load_images

__all__ = ["build_calibration_set", "load_images"]
