"""The stitched loop and its backends. Imports without torch (DESIGN.md: runtime rules)."""
