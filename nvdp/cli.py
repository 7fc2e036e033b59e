"""Command line: `nvdp [run]`, `nvdp demo`, `nvdp config validate`, `nvdp status`, `nvdp mps-host`.

Flags and environment variables are upstream's (see `nvdp.core.config.settings.OPTIONS`); this module is the only one
that reads `os.environ`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from nvdp import __version__
from nvdp.core.config.errors import ConfigError
from nvdp.core.config.load import load_config_file
from nvdp.core.config.schema import Config
from nvdp.core.config.settings import (
    OPTIONS,
    Option,
    Settings,
    check_dra_runnable,
    cli_values,
    parse_bool,
    resolve,
)
from nvdp.observe.logs import setup_logging

if TYPE_CHECKING:
    from nvdp.daemon import NodeConfig

log = logging.getLogger("nvdp")

SUBCOMMANDS = ("run", "demo", "config", "status", "mps-host")
#: What `nvdp demo` says when grpcio (the `emulator` extra) is not installed.
DEMO_NEEDS = "the kubelet emulator needs grpcio, which is not installed: pip install 'nvdp[emulator]'"


#: Run options `nvdp demo` does not take: it brings its own simulated node and kubelet, and has no node to label or
#: ConfigMap to read.
DEMO_OWN = ("simulate", "kubelet_socket", "config_dir", "config_map", "node_name", "node_label", "default_config",
            "fallback_strategies", "kubeconfig")


def show_default(option: Option) -> str | None:
    """An option's default as one would type it (`true`, `envvar`, `3s`); None when it has none (unset)."""
    value = option.default
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if option.kind == "seconds":
        return f"{float(value):g}s"
    return str(value)


def _add_options(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    for option in OPTIONS:
        if not option.flags or option.dest in skip:
            continue
        envs = ", ".join(f"${e}" for e in option.envs)
        default = show_default(option)
        help_text = f"{option.help} [env {envs}" + ("]" if default is None else f"; default {default}]")
        if option.choices:
            help_text += f"; one of {', '.join(option.choices)}"
        if option.kind == "bool":
            parser.add_argument(*option.flags, dest=option.dest, nargs="?", const="true", default=None,
                                metavar="BOOL", help=help_text)
        else:
            parser.add_argument(*option.flags, dest=option.dest, default=None, help=help_text)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its options; given `command` (`run`, `demo`, `config`, ...), the other subcommands
    without their copies of `run`'s ~50 options (~2 ms of start-up for the two unused copies)."""

    def wanted(name: str) -> bool:
        return command is None or command == name

    parser = argparse.ArgumentParser(
        prog="nvdp", description="NVIDIA GPU device plugin for Kubernetes (time-slicing, MPS and MIG sharing).")
    parser.add_argument("--version", action="version", version=f"nvdp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="serve the node's GPUs to the kubelet (the default command)")
    if wanted("run"):
        _add_options(run)
    demo = sub.add_parser(
        "demo", help="run nvdp on a simulated GPU node against an embedded kubelet emulator",
        description="Run nvdp on a simulated GPU node against an embedded kubelet emulator. Takes `nvdp run`'s "
                    "flags (--config-file included; environment variables are not read), so what it shows is what "
                    "a node with those settings would answer; without flags, a default install's answer.")
    demo.add_argument("--simulate", type=Path, default=None, help="simulated node YAML (default: built-in node)")
    if wanted("demo"):
        _add_options(demo, skip=DEMO_OWN)
    status = sub.add_parser("status", help="show what a running nvdp serves (from its metrics endpoint)")
    status.add_argument("--address", default=None,
                        help="the daemon's metrics address [env $METRICS_ADDRESS; default :9400]")
    host = sub.add_parser("mps-host", help="own the MPS control daemons for nvdp, so that they outlive it "
                                           "(docs/mps.md)")
    host.add_argument("--mps-root", default=None, help="the MPS root, as nvdp's [env $MPS_ROOT]")
    host.add_argument("--socket", default=None,
                      help="where to listen [env $MPS_HOST_SOCKET; default <mps root>/nvdp-mps-host.sock]")
    host.add_argument("--driver-root", default=None, type=Path,
                      help="root of the NVIDIA driver installation [env $NVIDIA_DRIVER_ROOT; default /]")
    host.add_argument("--simulate", type=Path, default=None,
                      help="a simulated GPU node (its fake control program and NVML) [env $NVDP_SIMULATE]")
    host.add_argument("--log-level", default=None, help="log level [env $LOG_LEVEL; default info]")
    host.add_argument("--log-format", default=None, help="text or json [env $LOG_FORMAT; default text]")
    config = sub.add_parser("config", help="config file tools")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    validate = config_sub.add_parser(
        "validate", help="check configs with the deployed flags and env vars and print what the node will do",
        description="Check each config (FILE, or every config of --config-dir, or --config-file) with the same "
                    "flags and environment variables as `nvdp run`, and print every error, the warnings and the "
                    "plan. With --simulate NODE.yaml the checks that need a node run too. Exit 0: valid "
                    "(warnings allowed), 1: invalid.")
    validate.add_argument("files", nargs="*", type=Path, metavar="FILE",
                          help="config files (default: --config-file, and every config of --config-dir)")
    validate.add_argument("--strict", action="store_true", help="count warnings as errors")
    # The flags of `nvdp run` (one definition, OPTIONS): --simulate is the node to check against.
    if wanted("config"):
        _add_options(validate)
    return parser


#: Longest that reading and parsing the config file may take (it is at most 1 MiB: about 0.8 s with libyaml on the
#: development VM); past it the load fails with a ConfigError instead of holding the caller.
CONFIG_LOAD_TIMEOUT_S = 10.0
#: Set while no config load is running (see `load_config_within`).
_LOAD_IDLE = threading.Event()
_LOAD_IDLE.set()


def load_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Resolve flag > env > file > default. The config file's own location follows the same precedence."""
    cli = cli_values(args)
    config_file = cli.get("config_file") or env.get("CONFIG_FILE")
    config = load_config_within(Path(config_file)) if config_file else None
    return resolve(cli, env, config, config_source=str(config_file) if config_file else "config file")


def load_config_within(path: Path, timeout_s: float | None = None) -> Config:
    """`load_config_file` (size- and type-bounded: no FIFO, nothing above 1 MiB) in a worker thread, given at most
    `timeout_s` (default `CONFIG_LOAD_TIMEOUT_S`). A load that overruns is abandoned: the thread is a daemon thread
    and its input is bounded, so it ends on its own and never holds the process's exit."""
    timeout_s = CONFIG_LOAD_TIMEOUT_S if timeout_s is None else timeout_s
    outcome: list[Config | ConfigError] = []
    if not _LOAD_IDLE.is_set():
        # An earlier load overran and is still running (a hung filesystem): one stuck thread is enough.
        raise ConfigError(f"{path}: an earlier load of the config file has not finished; not loaded")
    _LOAD_IDLE.clear()

    def work() -> None:
        try:
            outcome.append(load_config_file(path))
        except ConfigError as exc:
            outcome.append(exc)
        except Exception as exc:  # anything else from the parser is a bad config, not a crash
            outcome.append(ConfigError(f"{path}: cannot load config file: {type(exc).__name__}"))
        finally:
            _LOAD_IDLE.set()

    worker = threading.Thread(target=work, name="nvdp-config-load", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise ConfigError(f"{path}: reading and parsing took longer than {timeout_s:g} s; not loaded")
    result = outcome[0]
    if isinstance(result, ConfigError):
        raise result
    return result


#: Exceptions that say what is wrong with a file, a flag or the node, by class name (the classes live in modules the
#: CLI does not import up front): one line on stderr, never a traceback.
USER_ERRORS = frozenset({
    "ConfigError", "KubeConfigError", "StartupError", "SimNodeError", "SimBuildError", "MpsError", "ShmError",
    "StatusError", "RegistrationError",
})
#: Set (to anything) to see the traceback of an unexpected error.
TRACEBACK_ENV = "NVDP_TRACEBACK"
#: What to do, per kind of error, where the message alone does not say.
_HINTS = {
    "SimNodeError": "check the simulated node file (its keys are in docs/simulation.md), or leave --simulate out "
                    "for the built-in node",
    "MpsError": "see docs/mps.md",
    "ShmError": "see docs/mps.md (--mps-shm-size)",
}


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def explain(exc: BaseException) -> str:
    """One line for an error that ended a command: the first user error in it (nurseries wrap errors in groups,
    next to the cancellations they caused), else the unexpected error itself, said to be a bug."""
    leaves = _leaves(exc)
    user = next((leaf for leaf in leaves if type(leaf).__name__ in USER_ERRORS), None)
    if user is not None:
        name = type(user).__name__
        text = " ".join(str(user).split()) or name
        if name in ("ConfigError", "KubeConfigError"):
            return f"invalid configuration: {text}"
        hint = _HINTS.get(name)
        if name == "StartupError" and text.startswith("no config to serve"):
            hint = "see docs/node-config.md"
        return f"{text}; {hint}" if hint else text
    first = leaves[0]
    text = " ".join(str(first).split())
    return (f"unexpected error: {type(first).__name__}{': ' + text if text else ''} (a bug in nvdp: please report "
            f"it; set {TRACEBACK_ENV}=1 to see where it happened)")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Whatever goes wrong ends in one line on stderr and a non-zero exit, never a traceback
    (unless $NVDP_TRACEBACK is set)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "run")
    command = " ".join(argv[:2]) if argv[0] == "config" and len(argv) > 1 else argv[0]
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise
    except BaseException as exc:
        if os.environ.get(TRACEBACK_ENV):
            raise
        line = explain(exc)
        logging.getLogger("nvdp").debug("%s", line, exc_info=exc)
        print(f"nvdp {command}: {line}", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    args = build_parser(argv[0] if argv[0] in SUBCOMMANDS else None).parse_args(argv)
    env = dict(os.environ)
    try:
        if args.command == "demo":
            try:
                from nvdp.demo import run_demo
            except ModuleNotFoundError as exc:
                # The kubelet emulator speaks gRPC through grpcio, an optional extra (a node never needs it).
                if (exc.name or "").partition(".")[0] != "grpc":
                    raise
                print(f"nvdp demo: {DEMO_NEEDS}", file=sys.stderr)
                return 1

            setup_logging("warning", "text")
            return trio.run(run_demo, args.simulate, demo_settings(args))
        if args.command == "status":
            from nvdp.observe.status import status_main

            return status_main(args.address or env.get("METRICS_ADDRESS") or ":9400")
        if args.command == "mps-host":
            return mps_host(args, env)
        if args.command == "config":
            return config_validate(args, env)
        return run(args, env)
    except ConfigError as exc:
        print(f"nvdp: invalid configuration: {exc}", file=sys.stderr)
        return 1


def config_validate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`nvdp config validate`: the files named, else the deployed --config-file and every config of --config-dir."""
    from nvdp.validate import NothingValidated, validate_configs

    cli = cli_values(args)
    # What the command line names; else what the deployed environment does (`nvdp run` prefers the directory).
    config_file, config_dir_text = cli.get("config_file"), cli.get("config_dir")
    files = list(args.files) + ([Path(config_file)] if config_file else [])
    config_dir = Path(config_dir_text) if config_dir_text else None
    if not files and config_dir is None:
        if env.get("CONFIG_FILE_SRCDIR"):
            config_dir = Path(env["CONFIG_FILE_SRCDIR"])
        elif env.get("CONFIG_FILE"):
            files.append(Path(env["CONFIG_FILE"]))
        else:
            print("nvdp config validate: no config: name FILEs, or give --config-file or --config-dir "
                  "(or CONFIG_FILE, CONFIG_FILE_SRCDIR)", file=sys.stderr)
            return 2
    simulate_text = cli.get("simulate") or env.get("NVDP_SIMULATE")
    # --strict, or the daemon's strict mode (--strict-config / STRICT_CONFIG) where the deployment sets it.
    strict_text = getattr(args, "strict_config", None) or env.get("STRICT_CONFIG") or "false"
    try:
        strict = args.strict or parse_bool(strict_text)
    except ValueError:
        print(f"nvdp config validate: STRICT_CONFIG {strict_text!r}: expected true or false", file=sys.stderr)
        return 2
    try:
        code, text = validate_configs(files, config_dir, cli, env, Path(simulate_text) if simulate_text else None,
                                      strict)
    except NothingValidated as exc:
        print(f"nvdp config validate: {exc}", file=sys.stderr)
        return 1
    print(text)
    return code


def demo_settings(args: argparse.Namespace) -> Settings:
    """`nvdp demo`'s settings: its flags only (a demo must not pick up the shell's CONFIG_FILE or MIG_STRATEGY), over
    the defaults of a fresh install."""
    settings = load_settings(args, {})
    # Nothing outside the demo's temporary directory unless asked for: no port, no NFD feature file.
    return dataclasses.replace(
        settings, metrics_address=args.metrics_address or "",
        nfd_features_file=settings.nfd_features_file if args.nfd_features_file else None)


def mps_host(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from nvdp.mps_host import host_main

    setup_logging(args.log_level or env.get("LOG_LEVEL") or "info", args.log_format or env.get("LOG_FORMAT") or "text")
    simulate = args.simulate or (Path(env["NVDP_SIMULATE"]) if env.get("NVDP_SIMULATE") else None)
    return host_main(args.mps_root or env.get("MPS_ROOT", ""), socket_path=args.socket or env.get("MPS_HOST_SOCKET"),
                     driver_root=args.driver_root or Path(env.get("NVIDIA_DRIVER_ROOT") or "/"), simulate=simulate,
                     search_path=env.get("PATH", os.defpath))


def node_config_for(args: argparse.Namespace, env: Mapping[str, str], settings: Settings) -> NodeConfig | None:
    """Per-node configs (a config directory and/or a ConfigMap, chosen by a node label) and API access."""
    if settings.config_dir is None and not settings.config_map and not settings.node_name:
        # Neither is configured: keep the Kubernetes client (httpx) out of the process altogether.
        return None
    from nvdp.core.config.selection import check_fallbacks
    from nvdp.daemon import NodeConfig
    from nvdp.k8s.client import KubeConfigError, load_api_config
    from nvdp.node_config import ConfigSources, parse_config_map_ref

    sources = None
    if settings.config_dir is not None or settings.config_map:
        config_map = parse_config_map_ref(settings.config_map, settings.pod_namespace) if settings.config_map else None
        sources = ConfigSources(
            config_dir=settings.config_dir, config_map=config_map, node_name=settings.node_name,
            node_label=settings.node_label, default_config=settings.default_config,
            fallbacks=check_fallbacks(settings.fallback_strategies))
        if settings.config_file is not None:
            log.warning("--config-file %s is ignored: the config is chosen from the named configs",
                        settings.config_file)
    api = None
    if (sources is not None and sources.needs_api) or settings.node_name:
        try:
            api = load_api_config(env, settings.kubeconfig)
        except KubeConfigError as exc:
            if settings.dra_enabled:
                # ResourceSlices and claims are read and written through the API: DRA cannot run without it.
                raise ConfigError(f"DRA is enabled but there is no Kubernetes API access: {exc} (run in a pod with "
                                  "a service account, or give --kubeconfig)") from None
            if sources is not None and sources.needs_api:
                raise
            log.info("no Kubernetes API access (%s): no Events on the Node", exc)
    if sources is None and api is None:
        return None

    def make_settings(config: Config | None, source: str) -> Settings:
        return resolve(cli_values(args), env, config, config_source=source)

    return NodeConfig(sources, api, make_settings)


def warn_about(settings: Settings) -> None:
    """Settings that are valid but do something the operator may not expect: said once, at start."""
    if settings.kubelet_socket is None:
        # Upstream's meaning of an empty --kubelet-socket; the daemon serves its sockets in the temp directory.
        log.warning("--kubelet-socket is empty: nvdp registers with no kubelet and serves its plugin sockets in %s",
                    tempfile.gettempdir())


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = load_settings(args, env)
    check_dra_runnable(settings)
    from nvdp.daemon import StartupError, run_daemon

    setup_logging(settings.log_level, settings.log_format)
    log.info("nvdp %s starting", __version__)
    warn_about(settings)
    node_config = node_config_for(args, env, settings)

    def reload_settings() -> Settings:
        return load_settings(args, env)

    try:
        return trio.run(lambda: run_daemon(
            settings, reload_settings=reload_settings, notify_socket=env.get("NOTIFY_SOCKET"),
            search_path=env.get("PATH", os.defpath), node_config=node_config))
    except StartupError as exc:
        log.error("%s", exc)
        print(f"nvdp: {exc}", file=sys.stderr)
        return 1
