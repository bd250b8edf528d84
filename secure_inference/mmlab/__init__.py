"""MMLab integration: compatibility fixes, registry entries and config helpers."""
