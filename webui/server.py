"""Start the app: parse flags, build the engine, serve the UI and/or the API."""
from __future__ import annotations

import argparse
import logging
import re
import sys
import webbrowser
from pathlib import Path
from typing import Any

from webui.cli import parse_args
from webui.demo.derive import ensure_demo_models
from webui.engine.engine import Engine
from webui.errors import UserError
from webui.extensions import load_extensions
from webui.guards import LoginThrottle, with_deadlines
from webui.jobs import JobQueue
from webui.settings import AppConfig

log = logging.getLogger("webui")

# Gradio's upload route takes any size without a limit: a 4096x4096 PNG (the default largest side) of noise is 48 MB.
MAX_UPLOAD = "100mb"


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.loglevel)
    for line in args.no_effect:
        log.warning(line)
    several = bool(args.workers or args.ray_address)
    if several:  # (Ray is imported only here)
        from webui.serve.cluster import ingress_args, start_replicas
    try:
        config = AppConfig.from_args(ingress_args(args) if several else args)
        ensure_demo_models(config.paths.builtin_models_dir, config.paths.builtin_modules_dir)
        engine = Engine(config)
    except UserError as e:
        sys.exit(f"Cannot start: {e}")
    load_extensions(engine)
    try:
        jobs = start_replicas(args, engine) if several else JobQueue(engine)
    except Exception as e:  # (Ray's own errors: a replica whose engine could not start, a cluster not found)
        sys.exit(f"Cannot start the engine replicas: {e} (what a replica said is in the log above)")
    for warning in open_access_warnings(args):
        log.warning(warning)
    with engine.options.overridden(checkpoint_choice(engine, args.ckpt)):
        if args.nowebui:
            serve_api_only(jobs, bind_address(args), args)
        else:
            serve_ui(engine, jobs, bind_address(args), args)


def bind_address(args: argparse.Namespace) -> str:
    """The address to serve on: --server-name's, else all of them with --listen, else this machine only."""
    return args.server_name or ("0.0.0.0" if args.listen else "127.0.0.1")


def open_access_warnings(args: argparse.Namespace) -> list[str]:
    """What others can reach without a password, with the flag that would ask for one."""
    warnings = []
    network = bind_address(args) not in ("127.0.0.1", "localhost", "::1")
    if (network or args.share) and (args.api or args.nowebui) and not args.api_auth:
        warnings.append("The API is open to anyone who can reach this machine (--listen, --server-name or --share "
                        "without --api-auth): they can generate and change settings. Add --api-auth USER:PASS.")
    if args.share and not args.nowebui and not args.gradio_auth:
        warnings.append("The public --share link opens the UI to anyone who has it. Add --gradio-auth USER:PASS.")
    elif network and not args.nowebui and not args.gradio_auth:
        warnings.append("The UI is open to anyone on your network (--listen or --server-name without "
                        "--gradio-auth). Add --gradio-auth USER:PASS.")
    return warnings


def checkpoint_choice(engine: Engine, path: Path | None) -> dict[str, Any]:
    """The option change that makes --ckpt's file the checkpoint of this run (not saved for the next one by
    itself); none when it is not given or not a checkpoint."""
    if path is None:
        return {}
    try:
        info = engine.models.add_checkpoint(path)
    except UserError as e:
        log.warning("--ckpt: %s; using the checkpoint the settings select.", e)
        return {}
    log.info("--ckpt: this run uses %s", info.path)
    return {"sd_model_checkpoint": engine.models.title(info)}


def add_middlewares(app: Any, args: argparse.Namespace) -> None:
    """Doubled slashes, --cors-allow-origins(-regex) and --theme. Outermost, so that cross-origin preflights are
    answered before Gradio's own CORS check (which allows only localhost pages); also after Gradio has served its
    first request: the middleware stack is built again at the next one."""
    app.middleware_stack = None
    app.add_middleware(SameSiteOnly, hosts=answered_hosts(args),
                       origins=[o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip()],
                       origin_regex=args.cors_allow_origins_regex)
    if args.api_auth or args.gradio_auth:
        app.add_middleware(LoginThrottle)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(SingleSlashes)
    if args.cors_allow_origins or args.cors_allow_origins_regex:
        from starlette.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=args.cors_allow_origins_regex,
                           allow_methods=["*"], allow_headers=["*"], allow_credentials=True)
    if args.theme and not args.nowebui:
        app.add_middleware(ThemeRedirect, theme=args.theme)


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def answered_hosts(args: argparse.Namespace) -> set[str] | None:
    """The Host names the server answers to: its own loopback names and address when it serves this machine alone
    (a page whose name was rebound to 127.0.0.1 is refused), plus --allowed-hosts; None (any) when it is reachable
    from elsewhere (--listen, a network --server-name, --share), unless --allowed-hosts names them."""
    extra = {h.strip().lower() for h in (args.allowed_hosts or "").split(",") if h.strip()}
    address = bind_address(args)
    local = address in LOOPBACK_NAMES or address.startswith("127.")
    if (not local or args.share) and not extra:
        return None
    return LOOPBACK_NAMES | {address} | extra if local else extra | {address}


def host_name(value: str) -> str:
    """``name`` of a Host header ``name[:port]`` (``[v6]:port`` too), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class SameSiteOnly:
    """DNS rebinding and cross-site requests: a Host the server does not answer to is a 403 (a page on
    rebind.example whose name now points at 127.0.0.1 cannot read or drive it), and a request that changes something
    (POST, PUT, PATCH, DELETE) from a page of another origin is a 403 unless --cors-allow-origins names it. Programs
    (webuiapi, SillyTavern's and Open WebUI's servers) send no Origin and are not concerned."""

    def __init__(self, app: Any, hosts: set[str] | None, origins: list[str], origin_regex: str | None):
        self.app, self.hosts, self.origins = app, hosts, set(origins)
        self.origin_regex = re.compile(origin_regex) if origin_regex else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            host = headers.get("host", "")
            if self.hosts is not None and host_name(host) not in self.hosts:
                await self._refuse(scope, send, f"this server does not answer to the host {host_name(host)!r} "
                                                "(start it with --allowed-hosts to add one)")
                return
            origin = headers.get("origin")
            if origin and not self._same_site(origin, host):
                if scope["type"] == "websocket" or scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                    await self._refuse(scope, send, f"requests from pages of {origin} are refused (start the server "
                                                    "with --cors-allow-origins to allow that site)")
                    return
                send = self._unreadable(send)
        await self.app(scope, receive, send)

    @staticmethod
    def _unreadable(send: Any) -> Any:
        """``send`` without CORS headers: Gradio's CORS layer lets any localhost page (another port, another app)
        read the answers; only the server's own page and --cors-allow-origins' sites may."""
        async def without_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(k, v) for k, v in message.get("headers", [])
                                      if not k.lower().startswith(b"access-control-allow-")]
            await send(message)

        return without_cors

    def _same_site(self, origin: str, host: str) -> bool:
        if origin in self.origins or (self.origin_regex is not None and self.origin_regex.fullmatch(origin)):
            return True
        return origin.split("://", 1)[-1].lower() == host.strip().lower()

    @staticmethod
    async def _refuse(scope: dict, send: Any, message: str) -> None:
        log.warning("Refused %s %s: %s", scope.get("method", "WEBSOCKET"), scope.get("path"), message)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import JSONResponse

        await JSONResponse({"detail": message}, status_code=403)(scope, None, send)


class SecurityHeaders:
    """Headers every answer carries: no other site may frame the page (clickjacking), no type sniffing, and the
    page's address is not sent to other sites."""

    HEADERS = [(b"x-frame-options", b"SAMEORIGIN"), (b"content-security-policy", b"frame-ancestors 'self'"),
               (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((k, v) for k, v in self.HEADERS if k not in present)]
            await send(message)

        await self.app(scope, receive, with_headers)


class SingleSlashes:
    """``//sdapi/v1/...`` is ``/sdapi/v1/...``: Open WebUI joins a base URL ending in "/" (as its docs suggest) and
    the path, and A1111's server answers it."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and "//" in scope["path"]:
            path = re.sub("/{2,}", "/", scope["path"])
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


class ThemeRedirect:
    """--theme: the page opened without a theme is sent to Gradio's ``?__theme=`` (A1111 does it in a script)."""

    def __init__(self, app: Any, theme: str):
        self.app, self.theme = app, theme

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        query = scope.get("query_string", b"").decode("latin-1")
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/" and "__theme=" not in query:
            from starlette.responses import RedirectResponse

            target = "?" + "&".join(filter(None, [query, f"__theme={self.theme}"]))  # relative: sub-paths work
            await RedirectResponse(target, status_code=307)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def http_protocol(args: argparse.Namespace) -> type:
    """uvicorn's HTTP protocol with --timeout-keep-alive's deadlines for slow clients."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return with_deadlines(AutoHTTPProtocol, args.timeout_keep_alive)


def serve_api_only(jobs: JobQueue, host: str, args: argparse.Namespace) -> None:
    import uvicorn
    from fastapi import FastAPI

    from webui.api import register_api

    app = FastAPI(title="Stable Diffusion web UI API", docs_url="/docs")
    register_api(app, jobs)
    add_middlewares(app, args)
    jobs.engine.hooks.fire("app_started", engine=jobs.engine, app=app)
    log.info("API only: http://%s:%d/sdapi/v1 (docs at /docs)", host, args.port)
    uvicorn.run(app, host=host, port=args.port, log_level="warning", http=http_protocol(args))


def serve_ui(engine: Engine, jobs: JobQueue, host: str, args: argparse.Namespace) -> None:
    from webui.api import register_api
    from webui.ui import build_ui

    import uvicorn.config

    demo = build_ui(engine, jobs)
    # Gradio makes uvicorn's Config itself, with no way to choose its protocol: the default one is replaced.
    uvicorn.config.HTTP_PROTOCOLS["auto"] = http_protocol(args)
    app, local_url, share_url = demo.launch(
        server_name=host, server_port=args.port, share=args.share, prevent_thread_lock=True,
        inbrowser=False, quiet=True, show_error=True, allowed_paths=[str(engine.config.paths.outdir)],
        auth=args.gradio_auth, max_file_size=MAX_UPLOAD, app_kwargs={"docs_url": "/docs"} if args.api else None,
    )
    if args.api:
        register_api(app, jobs)
        log.info("API: %ssdapi/v1 (docs at %sdocs)", local_url, local_url)
    add_middlewares(app, args)
    engine.hooks.fire("app_started", engine=engine, app=app)
    log.info("Web UI: %s", local_url)
    if args.share:
        if share_url:
            log.info("Public share link: %s", share_url)
        else:
            log.warning("Could not create a public share link (no internet access, or the tunnel service "
                        "refused). The UI is still served locally at %s.", local_url)
    if args.autolaunch:
        webbrowser.open(share_url or local_url)
    demo.block_thread()


if __name__ == "__main__":
    main()
