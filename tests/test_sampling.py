"""Samples from the live adapter: the `sample` command, scheduled prompts, and no effect on training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from tests.conftest import tunetop, wait_for, write_config
from tunetop.control.journal import read_events
from tunetop.runs.client_sync import send_command
from tunetop.runs.folders import RunDir, list_runs, resolve


def test_sampling_does_not_disturb_training(tmp_path: Path) -> None:
    training = {"iterations": 12, "steps_per_report": 1, "steps_per_eval": 6}
    plain = write_config(tmp_path / "plain.toml", training=training, lora={"dropout": 0.1})
    sampled = write_config(
        tmp_path / "sampled.toml",
        training=training,
        lora={"dropout": 0.1},
        sampling={"sample_prompts": ["Where does Ada live?", "Tell me about Bo."], "sample_every": 4, "temperature": 0.7},
    )
    tunetop("train", str(plain), check=True)
    tunetop("train", str(sampled), check=True)
    a, b = sorted(list_runs(), key=lambda r: r.status().get("name", ""))  # "plain", "sampled"
    losses = lambda run: [(e["iteration"], e["loss"]) for e in read_events(run.journal) if e["type"] in ("train", "validation")]  # noqa: E731
    assert losses(a) == losses(b)  # bit-identical, with dropout and temperature sampling in between
    samples = [e for e in read_events(b.journal) if e["type"] == "sample"]
    assert [s["iteration"] for s in samples] == [4, 4, 8, 8, 12, 12]
    assert all(isinstance(s["completion"], str) for s in samples)
    wa = mx.load(str(a.adapters / "adapters.safetensors"))
    wb = mx.load(str(b.adapters / "adapters.safetensors"))
    assert all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa)


def test_sample_command(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", training={"iterations": 100_000, "steps_per_report": 2})
    run: RunDir = resolve(tunetop("train", str(config), "--detach", check=True).stdout.strip())
    try:
        wait_for(lambda: send_command(run, "status").result["iteration"] >= 2)
        reply = send_command(run, "sample", {"prompt": "Where does Ada live?", "max_tokens": 8}, timeout=60)
        assert reply.ok and isinstance(reply.result["completion"], str) and reply.result["iteration"] >= 2
        assert reply.result["prompt_format"] == "chat"  # the demo data's prompts went in the chat template
        raw = send_command(run, "sample", {"prompt": "Where does Ada live?", "max_tokens": 8, "raw": True}, timeout=60)
        assert raw.ok and raw.result["prompt_format"] == "raw"
        bad = send_command(run, "sample", {"prompt": "x", "raw": "yes"})
        assert not bad.ok and "raw" in bad.error
        bad = send_command(run, "sample", {"prompt": "", "max_tokens": 8})
        assert not bad.ok and "prompt" in bad.error
        bad = send_command(run, "sample", {"prompt": "x", "max_tokens": 0})
        assert not bad.ok and "max_tokens" in bad.error
        event = next(e for e in read_events(run.journal) if e["type"] == "sample")
        assert event["prompt"] == "Where does Ada live?" and event["completion"] == reply.result["completion"]
        cli = tunetop("sample", run.id, "--prompt", "Tell me about Bo.", "--max-tokens", "4", "--json", check=True)
        assert json.loads(cli.stdout)["prompt_format"] == "chat"
        cli = tunetop("sample", run.id, "--prompt", "Tell me about Bo.", "--max-tokens", "4", "--raw", check=True)
        assert cli.stdout.startswith("sample: ok — from the weights of iteration ") and ", prompt raw, as typed:\n" in cli.stdout
    finally:
        if run.is_alive():
            os.kill(run.engine_pid() or 0, signal.SIGKILL)


PROMPT = "Where does Ada live?"


def test_each_split_remembers_how_its_prompts_were_formatted(tmp_path: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    from tunetop.training.data import RowFormat, load_split, prompt_tokens
    from tunetop.training.embedded import embedded_model_path

    chat_tokenizer = load_tokenizer(embedded_model_path())

    class NoTemplate:  # the same vocabulary, without a chat template (as many base models ship)
        eos_token_id = chat_tokenizer.eos_token_id
        chat_template = None
        has_chat_template = False

        def encode(self, text: str) -> list[int]:
            return list(chat_tokenizer.encode(text))

        def apply_chat_template(self, *_args: object, **_kwargs: object) -> list[int]:
            raise AssertionError("no chat template here")

    def split(name: str, rows: list[dict], tokenizer: object) -> str:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_split(path, tokenizer).prompt_format  # type: ignore[arg-type]

    pair = {"prompt": PROMPT, "completion": " name=Ada; city=Lyon."}
    chat = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Lyon."}]}
    text = {"text": "Ada lives in Lyon."}
    assert split("pairs", [pair, text], chat_tokenizer) == "chat"
    assert split("plain_pairs", [pair, pair, text], NoTemplate()) == "completion"
    assert split("chat", [chat], chat_tokenizer) == "chat"
    assert split("text", [text, text, pair], chat_tokenizer) == "text"  # what most rows were
    templated = chat_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    assert prompt_tokens(chat_tokenizer, PROMPT, "chat") == chat_tokenizer.encode(templated, add_special_tokens=False)
    assert prompt_tokens(chat_tokenizer, PROMPT, "text") == chat_tokenizer.encode(PROMPT)
    # data.chat_template: the run's own template formats the samples too
    other = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    path = tmp_path / "own.jsonl"
    path.write_text(json.dumps(pair) + "\n")
    own = load_split(path, chat_tokenizer, row_format=RowFormat(chat_template=other))
    assert own.prompt_format == "chat" and own.row_format.chat_template == other
    assert prompt_tokens(chat_tokenizer, PROMPT, "chat", own.row_format) == chat_tokenizer.encode(f"Q: {PROMPT}\nA:", add_special_tokens=False)


def _mlx_lm_generate(model: str, adapter: Path, prompt: str, *flags: str) -> str:
    """``mlx_lm.generate``'s own command line, in a process of its own (with tunetop's BLAS, for the same arithmetic)."""
    argv = ["mlx_lm.generate", "--model", model, "--adapter-path", str(adapter), "--prompt", prompt,
            "--max-tokens", "24", "--temp", "0", "--verbose", "False", *flags]
    code = f"import sys, engine; from mlx_lm.generate import main; sys.argv = {argv!r}; main()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.endswith("\n"), out
    return out.stdout[:-1]  # main() prints the response and a newline


def test_samples_are_formatted_as_mlx_lm_generate_formats_them(tmp_path: Path) -> None:
    """The demo trains on prompt/completion rows rendered in the chat template; a prompt put to the
    model raw (as tunetop did) came back as gibberish, while mlx_lm.generate, which applies the
    template, answered. The sampler must build the same prompt tokens and give the same greedy
    completion as mlx_lm.generate on the same adapter; --raw as --ignore-chat-template."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from tunetop.training import config
    from tunetop.training.adapters import save_adapters
    from tunetop.training.build import build_trainer
    from tunetop.training.sampling import sample, sampling_prompt

    cfg = config.parse(config.starter_text())
    cfg.training.batch_size = 4
    trainer, model_path, *_ = build_trainer(cfg, tmp_path / "adapters")
    for _ in range(60):
        trainer.step()
    adapter = save_adapters(trainer.model, tmp_path / "adapter", trainer.parameters.adapter_config).parent

    tokenizer: TokenizerWrapper = trainer.tokenizer
    assert trainer.prompt_format == "chat"
    # mlx_lm.generate's prompt, as its main() builds it for a model with a chat template
    templated = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    assert sampling_prompt(trainer, PROMPT) == tokenizer.encode(templated, add_special_tokens=False)
    assert sampling_prompt(trainer, PROMPT, raw=True) == PROMPT

    formatted = sample(trainer, PROMPT, 24, 0.0)
    raw = sample(trainer, PROMPT, 24, 0.0, raw=True)
    assert formatted == _mlx_lm_generate(model_path, adapter, PROMPT)
    assert raw == _mlx_lm_generate(model_path, adapter, PROMPT, "--ignore-chat-template")
