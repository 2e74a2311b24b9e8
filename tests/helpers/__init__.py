"""Helpers shared by test folders (import as `helpers.<module>`: pytest puts tests/ on sys.path)."""
