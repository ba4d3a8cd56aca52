"""Benchmarks (`optimist bench ...`): print a table and write JSON; not tests."""
