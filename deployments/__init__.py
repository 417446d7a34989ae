"""The Ray Serve layer: a thin deployment over an injected BATON engine front.

    protocol.py   OpenAI requests / responses / stream chunks (pydantic, shared by HTTP and handles)
    errors.py     OpenAIError and the mapping of client mistakes to 4xx in the OpenAI error shape
    front.py      the engine interface this layer codes against, and the production factory
    serving.py    request -> engine -> response, one code path for HTTP and handles
    server.py     BatonServer: FastAPI ingress, handle methods, reconfigure / health / autoscaling hooks
    metrics.py    Prometheus metrics and the signals record_autoscaling_stats() reports
    builder.py    build_app for `serve run` / `serve deploy` (args: configs.serve.BatonAppArgs)
    handle.py     BatonClient: typed calls from other Ray apps
    examples/     a second Ray app (summarise, then answer) that calls the engine through a handle

Nothing is imported here, so `import deployments.protocol` stays light.
"""
