"""The ``tunetop`` command line.

Exit codes (also in README.md): 0 success; 1 internal failure (a bug: the engine log has the
traceback); 2 bad input (config, data, model, arguments, unknown run); 3 the engine cannot be
reached or refused a command; 4 ``events`` met damaged journal records (every intact one was
printed, stderr names what was skipped); 130 interrupted by Ctrl-C (adapter saved first); 143
terminated by SIGTERM (adapter saved first). ``wait`` exits with how the run ended: 0, 10-17
(runs.notify.WAIT_CODES).

This module is the parser and `main`; the commands live in cli.train, cli.watch, cli.outputs, cli.compare
and cli.queue."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from tunetop.cli.common import CHECKPOINT_HELP, CONTROL_HELP, RUN_HELP, _fail, checkpoint_arg
from tunetop.cli.compare import cmd_compare
from tunetop.cli.labels import cmd_note, cmd_tag, tag_argv
from tunetop.cli.outputs import cmd_export, cmd_export_metrics, cmd_import_config, cmd_test
from tunetop.cli.queue import add_parsers as add_queue_parsers
from tunetop.cli.queue import main_argv as queue_argv
from tunetop.cli.train import cmd_demo, cmd_engine, cmd_follower, cmd_init, cmd_train, demo_config
from tunetop.cli.watch import (
    _attach,
    _parse_set_pairs,
    cmd_attach,
    cmd_control,
    cmd_events,
    cmd_keys,
    cmd_ls,
    cmd_remote_info,
    cmd_wait,
)
from tunetop.control.endpoints import SocketError
from tunetop.exit_codes import EXIT_DAMAGED, EXIT_UNREACHABLE
from tunetop.runs.folders import RunError
from tunetop.runs.queue import QueueError
from tunetop.training.config import LIVE_FIELDS, ConfigError

__all__ = ["EXIT_DAMAGED", "EXIT_UNREACHABLE", "build_parser", "demo_config", "main", "public_commands", "_parse_set_pairs"]


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's layout without the bare ``COMMAND`` line above the list of commands."""

    def _format_action(self, action: argparse.Action) -> str:
        text = super()._format_action(action)
        if isinstance(action, argparse._SubParsersAction):
            return text.split("\n", 1)[1]
        return text


def public_commands(parser: argparse.ArgumentParser) -> list[str]:
    """The commands ``tunetop --help`` lists (the internal ones have no help line)."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if isinstance(action, argparse._SubParsersAction):
            return [choice.dest for choice in action._choices_actions]
    return []


def _unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """A sentence for a first word that is no command ("" when it is one, or an option)."""
    if not argv or argv[0].startswith("-"):
        return ""
    subparsers = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))  # type: ignore[union-attr]
    if argv[0] in subparsers.choices:
        return ""
    import difflib

    commands = public_commands(parser)
    near = difflib.get_close_matches(argv[0], commands, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return f"'{argv[0]}' is not a tunetop command.{hint} Commands: {', '.join(commands)} (`tunetop --help` says what each does)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunetop",
        formatter_class=_HelpFormatter,
        description="LoRA fine-tuning on MLX you can watch and steer. `tunetop` alone opens the runs list.",
        epilog="RUN is a run id, a unique prefix of one, or a run name; it defaults to the latest run. "
        "`tunetop COMMAND --help` describes a command's options.",
    )
    # The metavar keeps the internal commands (_engine, _follower, _remote-info) out of the usage
    # line; they are added without help= so they get no line of their own either.
    sub = parser.add_subparsers(dest="name", metavar="COMMAND", title="commands")

    p = sub.add_parser("train", help="start a run from a TOML config, or continue one with --resume")
    p.add_argument("config", nargs="?")
    p.add_argument("--detach", action="store_true", help="run the engine in the background; print the run id")
    p.add_argument("--resume", metavar="RUN", nargs="?", const="", help="continue RUN (default: the latest) in place")
    p.add_argument("--from", dest="start_from", type=int, metavar="ITERATION", help="the checkpoint to resume from")
    p.add_argument("--listen", default="", metavar="tcp://ADDR:PORT", help="also serve on TCP, CURVE-encrypted (see `tunetop keys`)")
    p.add_argument("--np", type=int, default=1, metavar="N", help="data-parallel over N processes on this machine")
    p.add_argument("--hosts", default="", metavar="H1,H2,...", help="data-parallel, one rank per host over ssh (H1 = here; [user@]ip[:ssh_port])")
    p.add_argument("--backend", choices=["ring", "mpi", "nccl"], default="ring", help="mx.distributed backend (default ring)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("init", help="write a commented starter config")
    p.add_argument("path")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("demo", help="train the embedded default model, with the TUI on a terminal")
    p.add_argument("--headless", action="store_true", help="no TUI, print progress lines")
    p.add_argument("--iterations", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("attach", help="open the TUI on a run: RUN, or user@host[:port]:RUN over ssh")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--theme")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser(
        "ls", help="list runs, here or on HOST (user@host[:port], over ssh)",
        epilog="One run per line. ITER: the last iteration reported, of the run's total; LOSS: the last "
        "training loss; ALIVE: whether its engine runs; AGE: how long ago the run last reported anything (a "
        "training report, a validation, a save, a pause or its end); --json gives it as `updated`, an ISO time.",
    )
    p.add_argument("host", nargs="?")
    p.add_argument("--json", action="store_true", help="one JSON object per run with raw values (numbers, an ISO time), for scripts")
    p.add_argument("--all", action="store_true", help="also the runs that failed before training (hidden by default)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("compare", help="runs side by side: state, best validation loss, speed, and the config keys that differ")
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run ids, prefixes or names, a tag the runs carry (a sweep's id), or user@host[:port]:RUN over ssh; "
                   "none: the runs of the latest sweep or tag")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("events", help="print a run's events as JSON lines")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--since", type=int, default=0)
    p.add_argument("--follow", action="store_true")
    p.add_argument("--digest", action="store_true", help="a long run's digest: rare events whole, train events thinned")
    p.set_defaults(func=cmd_events)

    for name, what in CONTROL_HELP.items():
        p = sub.add_parser(name, help=what)
        p.add_argument("run", nargs="?", help=RUN_HELP)
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--json", action="store_true", help="print the reply's result as one JSON object, for scripts")
        p.set_defaults(func=cmd_control, command=name)
    p = sub.add_parser("wait", help="block until a run ends (or pauses on a non-finite step); the exit code says how")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (exit 17); 0 = no limit")
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("sample", help="complete a prompt with a live run's current weights (between steps)")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as it is; by default it is formatted as the run's data was (the chat template for chat data)")
    p.add_argument("--checkpoint", type=checkpoint_arg, metavar="ITERATION|best",
                   help="a saved checkpoint's adapter, loaded here (no engine needed), instead of the live weights")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true", help="print the reply's result as one JSON object, for scripts")
    p.set_defaults(func=cmd_control, command="sample")
    p = sub.add_parser("set", help="change a live run's settings: " + ", ".join(LIVE_FIELDS))
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the reply's result as one JSON object, for scripts")
    p.set_defaults(func=cmd_control, command="set")

    p = sub.add_parser("tag", help="show or change a run's tags: tag RUN +x -y (the change is journaled)")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("changes", nargs="*", metavar="+TAG|-TAG", help="+x adds tag x, -y removes tag y; none: print the tags")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the run's tags and note as one JSON object")
    p.set_defaults(func=cmd_tag)
    p = sub.add_parser("note", help="show or set a run's note: note RUN \"text\" (journaled; --clear removes it)")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("text", nargs="?", help="the new note; none: print the note")
    p.add_argument("--clear", action="store_true", help="remove the note")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the run's tags and note as one JSON object")
    p.set_defaults(func=cmd_note)

    p = sub.add_parser("test", help="score a run's saved adapter on its test split (or another): loss and perplexity")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--split", choices=["test", "valid", "train"], default="test")
    p.add_argument("--checkpoint", type=checkpoint_arg, metavar="ITERATION|best", help=CHECKPOINT_HELP)
    p.add_argument("--batches", type=int, default=0, help="batches of training.batch_size to score; 0 = the whole split")
    p.add_argument("--base", action="store_true", help="the base model without the adapter, for comparison")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a sentence")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("export", help="export a run's adapter: mlx (adapter folder), peft, or fused (merged model)")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--format", choices=["mlx", "peft", "fused"], required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--checkpoint", type=checkpoint_arg, metavar="ITERATION|best", help=CHECKPOINT_HELP)
    p.add_argument("--force", action="store_true", help="write into a non-empty --output folder (same-named files are replaced)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-metrics", help="a run's training and validation metrics as CSV or JSON lines")
    p.add_argument("run", nargs="?", help=RUN_HELP)
    p.add_argument("--format", choices=["csv", "jsonl", "tensorboard"], default="csv")
    p.add_argument("--output")
    p.set_defaults(func=cmd_export_metrics)

    p = sub.add_parser("import-config", help="turn an mlx_lm.lora YAML config into a tunetop TOML config")
    p.add_argument("yaml")
    p.add_argument("--output", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_import_config)

    add_queue_parsers(sub)

    p = sub.add_parser("keys", help="make and print your client key for TCP listeners")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("_remote-info")
    p.add_argument("run", nargs="?", default="")
    p.set_defaults(func=cmd_remote_info)

    p = sub.add_parser("_engine")
    p.add_argument("run_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--from", dest="start_from", type=int)
    p.add_argument("--listen", default="")
    p.add_argument("--np", type=int, default=1)
    p.add_argument("--hosts", default="")
    p.add_argument("--backend", default="ring")
    p.add_argument("--launched", action="store_true", help="started by mlx.launch: MLX_RANK says which rank")
    p.add_argument("--config-source", default="", help="the file the run's config was copied from, for messages")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("_follower")
    p.add_argument("--backend", default="ring")
    p.set_defaults(func=cmd_follower)
    for choice in sub._choices_actions:  # `tunetop X --help` starts with the line `tunetop --help` gives X
        sub.choices[choice.dest].description = choice.help
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    # `tunetop set KEY=VALUE` without a run: argparse would take KEY=VALUE as the run.
    if len(argv) >= 2 and argv[0] == "set" and "=" in argv[1]:
        argv = ["set", "", *argv[1:]]
    argv = queue_argv(argv)
    if argv[:1] == ["tag"]:
        argv = tag_argv(argv)
    unknown = _unknown_command(parser, argv)
    if unknown:
        return _fail(unknown)
    args = parser.parse_args(argv)
    if args.name is None:
        return _attach(None, None, runs_list=True)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `tunetop ls | head`: the reader has gone, which is no error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as error:
        return _fail(str(error))
    except (RunError, SocketError, QueueError) as error:  # QueueError: an unreadable queue file, named
        return _fail(str(error))
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        where = f" {error.filename}" if error.filename else ""
        if isinstance(error, PermissionError) and "another user" in str(error.strerror):
            return _fail(f"cannot use{where}: {error.strerror}.")  # exit 2: where the state lives is the user's choice
        return _fail(f"cannot use{where}: {error.strerror}. Free some space (or fix the folder's permissions) "
                     "and try again.", 1)
    except KeyboardInterrupt:
        return 130
