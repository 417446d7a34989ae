"""The application builder for `serve run` / `serve deploy`.

serve_config.yaml names it as `import_path: deployments.builder:build_app` with `args` validated by
`configs.serve.BatonAppArgs` (preset + engine overrides + server options); an unknown key or a bad value
fails the deploy with a message naming it. The application is two deployments, as in Ray Serve LLM:

- `BatonIngress` (deployments/server.py): HTTP, auth, limits, tokenization, admission, SSE, failover.
  It holds no model and takes no CPU from the engines.
- `BatonEngine` (deployments/engine_server.py): one BATON engine per replica; it scales on the engines'
  own signals and takes the live knobs of its `user_config`.

Deployment options (replicas, autoscaling, limits, health checks, user_config) are Ray's own and come from
the `deployments:` section of the same file, per deployment name.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from configs import EngineConfig
from configs.serve import BatonAppArgs, ServerConfig
from deployments.engine_server import EngineServer
from deployments.front import FrontFactory
from deployments.server import BatonIngress


def build_app(args: dict[str, Any]) -> Application:
    """Serve's entry point: validate `args`, build the BATON application (the engine is built from config
    on each engine replica)."""
    app_args = args if isinstance(args, BatonAppArgs) else BatonAppArgs.model_validate(args or {})
    return make_app(app_args.engine_config, app_args.server)


def make_app(
    engine_config: EngineConfig,
    server_config: ServerConfig | None = None,
    front_factory: FrontFactory | None = None,
    engine_options: dict[str, Any] | None = None,
    ingress_options: dict[str, Any] | None = None,
) -> Application:
    """The BATON application for an engine config; `front_factory` injects another engine front into the
    engine replicas (tests, experiments; it must be importable or picklable on the replica);
    `engine_options` / `ingress_options` are Ray's deployment options of each (`max_ongoing_requests`,
    `autoscaling_config`, `user_config`, ...)."""
    server = server_config or ServerConfig()
    # mypy keeps a decorated class's own type; @serve.deployment made it a Deployment (.options, .bind).
    engine = EngineServer.options(**(engine_options or {})).bind(  # type: ignore[attr-defined]
        engine_config, front_factory, server.metrics_interval_s, server.model_name_for(engine_config.model)
    )
    ingress = BatonIngress.options(**(ingress_options or {}))  # type: ignore[attr-defined]
    app: Application = ingress.bind(engine, engine_config, server)
    return app
