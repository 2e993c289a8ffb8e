"""Benchmarks of django-socketmail against Django's own SMTP backend (not a test suite)."""
