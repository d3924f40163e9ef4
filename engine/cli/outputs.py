"""What a run leaves behind, for other tools: `test`, `export`, `export-metrics`, `import-config`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tunetop.cli.common import _fail


def cmd_test(args: argparse.Namespace) -> int:
    from tunetop.interop.evaluation import EvaluationError, score
    from tunetop.interop.export import ExportError, chosen_checkpoint
    from tunetop.runs.folders import resolve
    from tunetop.training import config as config_module
    from tunetop.training.build import ModelError
    from tunetop.training.data import DataError

    run = resolve(args.run)
    cfg = config_module.load(run.config)
    try:
        checkpoint = None if args.base else chosen_checkpoint(run, args.checkpoint)
        progress = _TestProgress(args.split) if sys.stderr.isatty() else None
        try:
            result = score(run, cfg, args.split, checkpoint, args.batches, base=args.base, progress=progress)
        finally:
            if progress is not None:
                progress.close()
    except (EvaluationError, DataError, ModelError, ExportError) as error:
        return _fail(str(error))
    if args.json:
        print(json.dumps({**result.__dict__, "perplexity": result.perplexity}))
    else:
        print(result.describe())
    return 0


def cmd_sample_saved(args: argparse.Namespace, run: Any) -> int:
    """`tunetop sample RUN --checkpoint ITERATION|best`: a completion from a saved adapter."""
    from tunetop.interop.evaluation import EvaluationError
    from tunetop.interop.export import ExportError, chosen_checkpoint
    from tunetop.interop.saved_sample import sample_saved
    from tunetop.training import config as config_module
    from tunetop.training.build import ModelError
    from tunetop.training.data import DataError
    from tunetop.training.sampling import SampleError

    cfg = config_module.load(run.config)
    max_tokens = config_module.coerce_field("sampling", "max_tokens", args.max_tokens, "--max-tokens")
    temperature = config_module.coerce_field("sampling", "temperature", args.temperature, "--temperature")
    try:
        checkpoint = chosen_checkpoint(run, args.checkpoint)
        assert checkpoint is not None
        result = sample_saved(run, cfg, checkpoint, args.prompt, max_tokens, temperature, args.raw)
    except (EvaluationError, ExportError, DataError, ModelError, SampleError) as error:
        return _fail(str(error))
    if args.json:
        print(json.dumps({"ok": True, **result.__dict__}))
    else:
        from tunetop.control.replies import describe_result

        print(f"sample: {describe_result('sample', result.__dict__)}")
    return 0


class _TestProgress:
    """`tunetop test`'s progress on a terminal's stderr: one line, rewritten in place (stdout keeps
    only the result, for scripts)."""

    def __init__(self, split: str) -> None:
        self.split = split
        self.started = time.monotonic()
        self.shown = 0.0
        self.written = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.shown < 0.2:  # a redraw five times a second is plenty
            return
        self.shown = now
        elapsed = now - self.started
        left = f", about {elapsed / done * (total - done):.0f}s left" if done < total else ""
        sys.stderr.write(f"\rscoring the {self.split} split: batch {done:,} of {total:,} ({done / total:.0%}){left}\x1b[K")
        sys.stderr.flush()
        self.written = True

    def close(self) -> None:
        if self.written:  # the line goes; the result follows on stdout
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def cmd_export(args: argparse.Namespace) -> int:
    from tunetop.interop.export import (
        EXPORTERS,
        ExportError,
        check_output,
        check_outside_run,
        chosen_checkpoint,
        saved_iteration,
    )
    from tunetop.runs.folders import resolve

    run = resolve(args.run)
    output = Path(args.output).expanduser().absolute()
    try:
        checkpoint = chosen_checkpoint(run, args.checkpoint)
        check_outside_run(run, output)
        check_output(output, args.force)
        out = EXPORTERS[args.format](run, output, checkpoint)
    except ExportError as error:
        return _fail(str(error))
    except OSError as error:  # a folder that cannot be written, a full disk
        return _fail(f"cannot export to {output}: {error.strerror or error}. Choose a folder you can write to.")
    iteration = saved_iteration(run, checkpoint)
    what = f"the adapter of iteration {iteration:,}" if iteration is not None else "the latest adapter"
    source = {None: "the latest save", "best": "the best checkpoint"}.get(args.checkpoint, f"checkpoint {checkpoint}")
    print(f"exported {what} ({source}) of run {run.id} as {args.format} to {out}")
    return 0


def cmd_export_metrics(args: argparse.Namespace) -> int:
    from tunetop.interop.export import metrics_text
    from tunetop.runs.folders import resolve

    if args.format == "tensorboard":
        from tunetop.control.journal import read_events
        from tunetop.interop.tensorboard import write_from_events

        if not args.output:
            return _fail("--format tensorboard needs --output DIR (the folder to point `tensorboard --logdir` at).")
        folder = Path(args.output)
        if folder.exists() and not folder.is_dir():
            return _fail(f"{folder} is a file; --format tensorboard writes into a folder: give a folder's path.")
        try:
            path = write_from_events(list(read_events(resolve(args.run).journal)), folder)
        except OSError as error:
            return _fail(f"cannot write to {folder}: {error.strerror or error}. Choose a folder you can write to.")
        print(f"wrote {path}")
        return 0
    text = metrics_text(resolve(args.run), args.format)
    if args.output:
        output = Path(args.output)
        if output.is_dir():
            return _fail(f"{output} is a folder; --output names the file to write, e.g. {output / ('metrics.' + args.format)}.")
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as error:
            return _fail(f"cannot write {output}: {error.strerror or error}. Choose a path you can write to.")
    else:
        sys.stdout.write(text)
    return 0


def cmd_import_config(args: argparse.Namespace) -> int:
    from tunetop.interop.import_config import import_yaml
    from tunetop.training import config as config_module

    cfg, imported = import_yaml(Path(args.yaml))
    output = Path(args.output)
    if output.exists() and not args.force:
        return _fail(f"{output} already exists; pass --force to overwrite it.")
    if output.is_dir():
        return _fail(f"{output} is a folder; --output names the TOML file to write, e.g. {output / 'run.toml'}.")
    try:
        config_module.save(cfg, output)
    except OSError as error:
        return _fail(f"cannot write {output}: {error.strerror or error}. Choose a path you can write to.")
    print(f"wrote {output}")
    if imported.filled:
        print("mlx_lm.lora's defaults for what the recipe leaves out (tunetop's own differ):")
        for line in imported.filled:
            print(f"  {line}")
    if imported.notes:
        print("not carried over, or carried with a difference:")
        for note in imported.notes:
            print(f"  {note}")
    if cfg.model.trust_remote_code:
        print(f"warning: trust_remote_code: true was carried over (model.trust_remote_code in {output}): training "
              f"will run the Python code that comes with {cfg.model.path}. Keep it only if you trust that code; "
              "otherwise set it to false.")
    return 0
