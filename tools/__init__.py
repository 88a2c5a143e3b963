"""Host-side tools (CLI helpers, workflow runner)."""
