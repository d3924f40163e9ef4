"""Samples from the weights as they are now: a prompt formatted as the run's data formats its
prompts, completed by mlx-lm's generation between two training steps, and cut short when asked.

The engine answers ``sample`` commands and ``sampling.sample_prompts`` with it; the training
state is untouched (see :func:`sample`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class SampleError(ValueError):
    """A sample that cannot be taken (a prompt too long for the run); the text says why and what to do."""


class SampleInterrupted(Exception):
    """A sample cut short because the run is stopping."""


PREFILL_TOKENS = 256
"""Prompt tokens run at a time before a sample's first token; each chunk is a chance to stop."""


def prompt_limit(trainer: Any) -> tuple[int, str]:
    """The longest prompt a sample takes, in tokens, and where that limit comes from.

    The run's ``data.max_seq_length``: what the adapter was trained on, and a bound on the
    time and memory the prompt costs (a 60,000-token prompt held the loop for many minutes).
    The model's own context (``max_position_embeddings``) when that is shorter.
    """
    limit, source = int(trainer.parameters.max_seq_length), "data.max_seq_length"
    context = getattr(getattr(trainer.model, "args", None), "max_position_embeddings", None)
    if isinstance(context, int) and 0 < context < limit:
        limit, source = context, "the model's max_position_embeddings"
    return limit, source


def sample(
    trainer: Any,
    prompt: str,
    max_tokens: int,
    temperature: float,
    raw: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """Complete ``prompt`` with the weights as they are now (mlx-lm's generation).

    The prompt is formatted as the run's training data formatted its prompts (the chat template
    for chat data and for prompt/completion data on a tokenizer that has one, :func:`sampling_prompt`);
    ``raw`` sends the text as it is. Training state is untouched: the model goes back to train
    mode, the compiled step is a separate function, and the trainer reseeds mx.random before
    every step anyway. ``should_stop`` is asked after every prefill chunk and every token; True
    raises :class:`SampleInterrupted`. A prompt over :func:`prompt_limit` raises :class:`SampleError`.
    """
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    tokenizer = trainer.tokenizer
    tokens = sampling_prompt(trainer, prompt, raw)
    if isinstance(tokens, str):  # raw text, tokenized as mlx-lm's generate does: a BOS unless it starts with one
        add_special_tokens = tokenizer.bos_token is None or not tokens.startswith(tokenizer.bos_token)
        tokens = tokenizer.encode(tokens, add_special_tokens=add_special_tokens)
    limit, source = prompt_limit(trainer)
    if len(tokens) > limit:
        raise SampleError(f"the prompt is {len(tokens)} tokens long; a sample takes at most {limit} ({source}). "
                          "Shorten the prompt.")

    def check(*_progress: int) -> None:
        if should_stop is not None and should_stop():
            raise SampleInterrupted("the sample was cut short: the run is stopping")

    model = trainer.model
    model.eval()
    try:
        completion = ""
        for response in stream_generate(
            model, tokenizer, tokens, max_tokens=max_tokens, sampler=make_sampler(temp=temperature),
            prefill_step_size=PREFILL_TOKENS, prompt_progress_callback=check,
        ):
            completion += response.text
            check()
        return completion
    finally:
        model.train()


def sampling_prompt(trainer: Any, prompt: str, raw: bool = False) -> list[int] | str:
    """What generation starts from: the prompt's tokens in the run's prompt format, or the raw text.

    Raw text goes to mlx-lm as a string, which tokenizes it as ``mlx_lm.generate
    --ignore-chat-template`` does.
    """
    from tunetop.training.data import prompt_tokens

    if raw:
        return prompt
    return prompt_tokens(trainer.tokenizer, prompt, trainer.prompt_format, trainer.row_format)
