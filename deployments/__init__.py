"""Connects the flows to schedules (and, later, work pools): nothing else lives here."""
