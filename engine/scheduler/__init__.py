"""Scheduling policies shared by the engine and the simulator."""
