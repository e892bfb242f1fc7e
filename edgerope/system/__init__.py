"""Low-level helpers every layer may use: atomic output files, temporary files, platform
file copies, memory and device queries.
"""
