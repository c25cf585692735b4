"""Start the app: parse flags, build the engine, serve the UI and/or the API."""
from __future__ import annotations

import argparse
import logging
import sys

from webui.cli import parse_args
from webui.engine.engine import Engine
from webui.errors import UserError
from webui.extensions import load_extensions
from webui.jobs import JobQueue
from webui.settings import AppConfig

log = logging.getLogger("webui")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging()
    try:
        engine = Engine(AppConfig.from_args(args))
    except UserError as e:
        sys.exit(f"Cannot start: {e}")
    load_extensions(engine)
    jobs = JobQueue(engine)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    for warning in open_access_warnings(args):
        log.warning(warning)
    if args.nowebui:
        serve_api_only(jobs, host, args.port)
    else:
        serve_ui(engine, jobs, host, args)


def open_access_warnings(args: argparse.Namespace) -> list[str]:
    """What others can reach without a password, with the flag that would ask for one."""
    warnings = []
    if (args.listen or args.share) and (args.api or args.nowebui) and not args.api_auth:
        warnings.append("The API is open to anyone who can reach this machine (--listen/--share without "
                        "--api-auth): they can generate and change settings. Add --api-auth USER:PASS.")
    if args.share and not args.nowebui and not args.gradio_auth:
        warnings.append("The public --share link opens the UI to anyone who has it. Add --gradio-auth USER:PASS.")
    elif args.listen and not args.nowebui and not args.gradio_auth:
        warnings.append("The UI is open to anyone on your network (--listen without --gradio-auth). "
                        "Add --gradio-auth USER:PASS.")
    return warnings


def serve_api_only(jobs: JobQueue, host: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from webui.api import register_api

    app = FastAPI(title="Stable Diffusion web UI API", docs_url="/docs")
    register_api(app, jobs)
    jobs.engine.hooks.fire("app_started", engine=jobs.engine, app=app)
    log.info("API only: http://%s:%d/sdapi/v1 (docs at /docs)", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def serve_ui(engine: Engine, jobs: JobQueue, host: str, args) -> None:
    from webui.api import register_api
    from webui.ui import build_ui

    demo = build_ui(engine, jobs)
    app, local_url, share_url = demo.launch(
        server_name=host, server_port=args.port, share=args.share, prevent_thread_lock=True,
        inbrowser=False, quiet=True, show_error=True, allowed_paths=[str(engine.config.paths.outdir)],
        auth=args.gradio_auth, app_kwargs={"docs_url": "/docs"} if args.api else None,
    )
    if args.api:
        register_api(app, jobs)
        log.info("API: %ssdapi/v1 (docs at %sdocs)", local_url, local_url)
    engine.hooks.fire("app_started", engine=engine, app=app)
    log.info("Web UI: %s", local_url)
    if args.share:
        if share_url:
            log.info("Public share link: %s", share_url)
        else:
            log.warning("Could not create a public share link (no internet access, or the tunnel service "
                        "refused). The UI is still served locally at %s.", local_url)
    demo.block_thread()


if __name__ == "__main__":
    main()
