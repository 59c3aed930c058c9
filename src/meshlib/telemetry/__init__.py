"""Tracing, metrics and access logs for every mesh call."""
