"""The engine core: pure Python (never imports torch). Requests, KV block accounting, scheduling,
the step loop and output processing."""
