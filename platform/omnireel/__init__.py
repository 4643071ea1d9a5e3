"""OmniReel: a unified video+audio diffusion model, served with Ray Serve and batch-rendered with Ray Data."""

__version__ = "0.1.0"
