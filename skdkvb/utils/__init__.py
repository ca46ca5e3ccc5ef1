"""Utilities shared by the package: the compatibility layer with other libraries."""
