"""Ray Serve deployments (imported as omnireel.deployments). Built by the serving issue."""
