"""Ray Serve deployments (imported as omnireel.deployments): the online driver of the stage graph.

app.py (build_app, the Serve config helpers, `omnireel serve`), args.py (AppArgs), ingress.py (the
OpenAI-style HTTP API) with request_parsing.py (bodies, uploads, references), job_book.py (job records,
transitions, expiry, uploads' references), job_store.py (JobStore, their single writer), job_runner.py
(JobRunner), stage_replica.py (the stage deployments' common base), encoders.py, backbone.py,
decoders.py; serve_config.yaml is the Serve config (the only place autoscaling is set).
"""
