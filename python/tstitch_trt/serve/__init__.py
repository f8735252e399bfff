"""`tstitch-trt serve`: the Ray Serve deployment (HTTP API, dynamic batching, back-pressure, web page).

launch.py starts Ray and blocks; app.py is the application (ingress + generator replicas);
requests.py parses and dispatches requests by the bundle's pipeline kind; policy.py is the
load-adaptive stitch ratio; metrics.py the Prometheus metrics. Needs the `serve` extra, not torch.
"""
