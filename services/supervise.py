"""``fanout``: run the whole gateway under supervisord.

``fanout run`` validates the settings (exit 78 on a bad one, before anything
starts), fills in the variables ``supervisord.conf`` expands, and replaces
itself with ``supervisord -n`` in the foreground: Ctrl-C stops everything.
``fanout start`` does the same with supervisord daemonized, and
``fanout ctl ARGS`` runs ``supervisorctl ARGS`` against it.
"""

import os
import subprocess
import sys
from pathlib import Path

from common import cli
from common import settings as settings_module

ROOT = Path(__file__).resolve().parent.parent
GATEWAYS = ("fanout-http", "fanout-ws", "fanout-redis:*", "fanout-nats:*")
USAGE = "usage: fanout run | fanout start | fanout ctl SUPERVISORCTL-ARGS"


def config_path() -> Path:
    return Path(os.environ.get("FANOUT_SUPERVISORD_CONF", ROOT / "supervisord.conf"))


def supervisor_environment(
    environ: dict[str, str], create_folders: bool = True
) -> dict[str, str]:
    """The environment supervisord and every Fanout process run with.

    ``create_folders`` makes the log and run folders (and the one beside
    the supervisord configuration); ``fanout ctl`` only talks to a
    supervisord that made them already.
    """
    settings = settings_module.load_or_exit(environ)
    if settings.consumer_name and settings.redis_consumers > 1:
        # supervisord gives every consumer the same environment: one name
        # would be one processing list, shared, its items delivered twice.
        settings_module.exit_bad_setting(
            f"FANOUT_CONSUMER_NAME={settings.consumer_name!r} is set with "
            f"FANOUT_REDIS_CONSUMERS={settings.redis_consumers}: the consumers "
            "would share one processing list and deliver its items twice; "
            "leave the name unset (each takes its process name) or run one"
        )
    conf = config_path()
    if not conf.is_file():
        where = (
            "FANOUT_SUPERVISORD_CONF"
            if "FANOUT_SUPERVISORD_CONF" in environ
            else "FANOUT_SUPERVISORD_CONF (unset: the checkout's own)"
        )
        settings_module.exit_bad_setting(f"{where}: {conf} is not a file")
    env = dict(environ)
    env.update(
        FANOUT_LOG_DIR=settings.log_dir,
        FANOUT_RUN_DIR=settings.run_dir,
        FANOUT_REDIS_CONSUMERS=str(settings.redis_consumers),
        FANOUT_NATS_CONSUMERS=str(settings.nats_consumers),
        FANOUT_EMBED_NATS=str("nats" in settings.embedded).lower(),
        FANOUT_EMBED_REDIS=str("redis" in settings.embedded).lower(),
    )
    # Children are found on PATH: put this virtualenv's scripts first.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    if create_folders:
        _create_folders(settings, conf)
    return env


def _create_folders(settings: settings_module.Settings, conf: Path) -> None:
    """The log and run folders, and supervisord's own beside ``conf``."""
    for env_name, folder in (
        ("FANOUT_LOG_DIR", settings.log_dir),
        ("FANOUT_RUN_DIR", settings.run_dir),
        ("FANOUT_SUPERVISORD_CONF", str(conf.parent / "var" / "run")),
    ):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or exc
            settings_module.exit_bad_setting(
                f"{env_name}: cannot create {folder} ({reason})"
            )


def main() -> None:
    args = sys.argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    if args == ["--version"]:
        print(f"fanout {cli.package_version()}")
        return
    if (
        not args
        or args[0] not in ("run", "start", "ctl")
        or (args[0] != "ctl" and len(args) > 1)
    ):
        # An argument it does not know: exit 2, as the other programs do.
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    env = supervisor_environment(dict(os.environ), create_folders=args[0] != "ctl")
    bin_dir = Path(sys.executable).parent
    conf = str(config_path())
    if args[0] == "ctl":
        command = [str(bin_dir / "supervisorctl"), "-c", conf, *args[1:]]
        if args[1:] == ["stop", "all"]:
            # supervisorctl stops "all" in start order, brokers first; stop
            # the gateway processes first so that they can still flush.
            subprocess.run([*command[:-1], *GATEWAYS], env=env, check=False)
    else:
        command = [str(bin_dir / "supervisord"), "-c", conf]
        if args[0] == "run":
            command.append("-n")
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
