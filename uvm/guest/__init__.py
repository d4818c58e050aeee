"""The agent that runs INSIDE the UVM as PID 1 (stdlib + schemas only)."""
