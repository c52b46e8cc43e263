"""Numeric kernels the stages share, kept apart so they can be tested and tuned on their own."""
