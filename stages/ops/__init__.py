"""Numeric kernels shared by stages: exact top-M selection, image decoding on the device."""
