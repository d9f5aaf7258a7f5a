"""Data files shipped with awq-edge (calibration text)."""
