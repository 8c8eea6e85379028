"""Task adapters (LoRA): PEFT adapters loaded and validated against the model, the host cache
and device slots they are served from, the per-step token -> slot mapping, and merging."""
