"""Thin commands that compose the stages: ``generate``, ``inpaint``, ``pipeline``, ``quickstart``, ``submit``.

Each parses, validates and calls library functions; the work lives in ``ddpm`` and the stage packages."""
