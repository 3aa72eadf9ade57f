"""The live web dashboard."""
