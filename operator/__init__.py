"""Optimist Kubernetes operator (kopf handlers and pure manifest builders)."""
