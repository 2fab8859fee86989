"""Apex visual inspection: plant databases -> curated data sets -> gated CNN service."""

__version__ = "0.1.0"
