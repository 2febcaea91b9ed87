"""Shared helpers for fine-tuning a small CNN on Fashion-MNIST.

Importing this package has no side effects: no data is read, no device is touched.
"""

__version__ = "0.1.0"
