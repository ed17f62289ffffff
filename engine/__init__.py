"""The model-execution core shared by prefill and decode workers."""
