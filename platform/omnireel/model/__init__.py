"""The omni model in plain PyTorch: no Ray, no pydantic, no torch.distributed (DESIGN.md §3)."""
