"""The application builder for `serve run` / `serve deploy`.

serve_config.yaml names it as `import_path: deployments.builder:build_app` with `args` validated by
`configs.serve.BatonAppArgs` (preset + engine overrides + server options); an unknown key or a bad value
fails the deploy with a message naming it. Deployment options (replicas, autoscaling, limits, health
checks, user_config) are Ray's own and come from the `deployments:` section of the same file.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from configs import EngineConfig
from configs.serve import BatonAppArgs, ServerConfig
from deployments.front import FrontFactory
from deployments.server import BatonServer


def build_app(args: dict[str, Any]) -> Application:
    """Serve's entry point: validate `args`, build the BATON application (the engine is built from config
    on each replica)."""
    app_args = args if isinstance(args, BatonAppArgs) else BatonAppArgs.model_validate(args or {})
    return make_app(app_args.engine_config, app_args.server)


def make_app(
    engine_config: EngineConfig,
    server_config: ServerConfig | None = None,
    front_factory: FrontFactory | None = None,
    deployment_options: dict[str, Any] | None = None,
) -> Application:
    """The BATON application for an engine config; `front_factory` injects another engine front (tests,
    experiments; it must be importable or picklable on the replica); `deployment_options` are Ray's
    (`max_ongoing_requests`, `autoscaling_config`, `user_config`, ...)."""
    # mypy keeps a decorated class's own type; @serve.deployment made it a Deployment (.options, .bind).
    deployment = BatonServer.options(**(deployment_options or {}))  # type: ignore[attr-defined]
    app: Application = deployment.bind(engine_config, server_config or ServerConfig(), front_factory)
    return app
