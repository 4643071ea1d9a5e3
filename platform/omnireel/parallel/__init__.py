"""How the model is split across ranks (tensor parallelism) and the Ray group that runs it."""
