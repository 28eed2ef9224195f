"""Shared command-line plumbing for the tools: --config, --set overrides, --run."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from .config import ConfigError, load_config, with_device
from .run import Run
from .store import ShardError, StaleCacheError, WriteError
from .voc import VOCError

USER_ERRORS = (ConfigError, StaleCacheError, ShardError, VOCError, WriteError, FileNotFoundError, ValueError,
               KeyError)


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None,
                    help=f"YAML config (default: the --run folder's config.yaml if it has one, else {DEFAULT_CONFIG})")
    ap.add_argument("--run", default=None, help="run folder (default: the config's run_dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable), e.g. --set features.scales=[480,688]")
    add_device_argument(ap)
    return ap


def add_device_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default=None, metavar="DEVICE",
                    help="where this call runs the networks: cpu, cuda, cuda:N or auto (CUDA when available); "
                         "default: the config's device (cpu unless set). Not saved in the run's config.yaml")


DEFAULT_CONFIG = "configs/demo.yaml"


def config_path(args) -> str:
    """``--config`` when given; else the settings of the run folder named by ``--run`` (a later stage, a test on
    another split or a resumed run keeps the run's own settings); else :data:`DEFAULT_CONFIG`."""
    if args.config:
        return args.config
    if args.run and (Path(args.run) / "config.yaml").is_file():
        return str(Path(args.run) / "config.yaml")
    return DEFAULT_CONFIG


def make_run(args) -> Run:
    """The run of a tool call; its config.yaml is (re)written only when the call's settings are the run's: no
    --set, or --overwrite (the stage is rebuilt with them); see :class:`~sppdet.run.Run`."""
    cfg = load_config(config_path(args), args.overrides)
    device = getattr(args, "device", None)
    if device:
        with_device(cfg, device)  # checked before anything is written
    run = Run(cfg, args.run, save_config=True if not args.overrides or getattr(args, "overwrite", False) else None)
    if device:  # this call's device only: config.yaml keeps the run's own
        run.cfg = with_device(run.cfg, device)
    return run


def run_main(fn: Callable[[], int], on_interrupt: str = "interrupted; rerun the same command to resume") -> int:
    """Run a tool body; user errors become one clear line and exit code 2, not a traceback; Ctrl-C prints
    ``on_interrupt`` and exits with 130."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn()
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(on_interrupt, file=sys.stderr)
        return 130


def stage_main(description: str, body: Callable[[Run, argparse.Namespace], None], argv: list[str] | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               overwrite: bool = True) -> int:
    """The whole ``main()`` of a stage tool: the common options, the tool's own (``add_arguments``)
    and ``--overwrite``; then ``body(run, args)`` under :func:`run_main`."""
    ap = parser(description)
    if add_arguments is not None:
        add_arguments(ap)
    if overwrite:
        ap.add_argument("--overwrite", action="store_true", help="rebuild this stage's outputs")
    args = ap.parse_args(argv)

    def fn() -> int:
        body(make_run(args), args)
        return 0

    return run_main(fn)
