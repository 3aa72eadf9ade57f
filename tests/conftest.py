"""Test-wide settings: hypothesis without per-example deadlines (numba loads its cache on
first call, and CI machines are slow and shared)."""

from hypothesis import settings

settings.register_profile("crucible", deadline=None)
settings.load_profile("crucible")
