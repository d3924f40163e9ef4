"""import-config trains what mlx_lm.lora trains: the installed mlx-lm's own argument handling runs
on each recipe, and what it would train with is compared with the imported config, key by key.

mlx-lm's defaults are read from the installed mlx-lm at test time, so the day it changes one,
or adds a key, these tests say so.
"""

from __future__ import annotations

import inspect
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import config as config_module
from engine.demo import embedded_data_path, embedded_model_path
from engine.import_config import DIRECT, NOT_USED, import_yaml
from engine.optimizers import CLASSES, build_optimizer, build_schedule
from tests.conftest import tunetop

HANDLED = set(DIRECT) | set(NOT_USED) | {
    "lora_parameters", "optimizer_config", "clear_cache_threshold", "lr_schedule", "hf_dataset", "report_to", "project_name"
}


def mlx_lm_args(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """The arguments mlx_lm.lora's main() would train with for ``recipe`` (its run() is caught)."""
    from mlx_lm import lora

    caught: list[types.SimpleNamespace] = []
    monkeypatch.setattr(lora, "run", lambda args, training_callback=None: caught.append(args))
    monkeypatch.setattr(sys, "argv", ["mlx_lm.lora", "--config", str(recipe)])
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # main() sets it; monkeypatch restores it
    lora.main()
    (args,) = caught
    return args


def mlx_lm_optimizer(args: types.SimpleNamespace) -> Any:
    """The optimizer mlx_lm.lora's train_model builds from its arguments."""
    import mlx.optimizers as optim

    name = args.optimizer.lower()
    cls = getattr(optim, CLASSES[name])
    return cls(learning_rate=args.learning_rate, **args.optimizer_config.get(name, {}))


def assert_trains_as_mlx_lm(cfg: config_module.RunConfig, args: types.SimpleNamespace) -> None:
    assert (cfg.model.path, cfg.data.path) == (args.model, args.data)
    assert (cfg.lora.fine_tune_type, cfg.lora.num_layers) == (args.fine_tune_type, args.num_layers)
    lora = args.lora_parameters
    assert (cfg.lora.rank, cfg.lora.scale, cfg.lora.dropout) == (lora["rank"], lora["scale"], lora["dropout"])
    assert cfg.lora.keys == list(lora.get("keys") or [])
    assert cfg.lora.model_precision is False and cfg.data.packing == "off"
    t = cfg.training
    assert (t.batch_size, t.iterations, t.steps_per_report, t.steps_per_eval) == (
        args.batch_size, args.iters, args.steps_per_report, args.steps_per_eval
    )
    assert t.validation_batches == (0 if args.val_batches == -1 else args.val_batches)
    assert cfg.checkpoints.save_every == args.save_every and cfg.data.max_seq_length == args.max_seq_length
    assert (t.grad_checkpoint, t.grad_accumulation_steps, t.seed) == (
        args.grad_checkpoint, args.grad_accumulation_steps, args.seed
    )
    assert cfg.data.mask_prompt == args.mask_prompt
    assert t.clear_cache_gb == args.clear_cache_threshold / 1e9
    for feature in ("text_feature", "prompt_feature", "completion_feature", "chat_feature"):
        assert getattr(cfg.data, feature) == getattr(args, feature, getattr(config_module.DataConfig(), feature))

    theirs, ours = mlx_lm_optimizer(args), build_optimizer(cfg.optimizer)
    assert type(ours) is type(theirs)
    for name in inspect.signature(type(theirs).__init__).parameters:
        if name not in ("self", "learning_rate"):
            mine, reference = getattr(ours, name), getattr(theirs, name)
            assert (list(mine) if isinstance(mine, tuple) else mine) == (
                list(reference) if isinstance(reference, tuple) else reference
            ), name
    rate = build_schedule(cfg.optimizer, cfg.schedule, t.iterations)
    if args.lr_schedule:
        from mlx_lm.tuner.utils import build_schedule as mlx_lm_schedule

        reference_rate = mlx_lm_schedule(args.lr_schedule)
        for step in range(t.iterations):  # float32 in mlx: a few roundings of 6e-8 relative to the peak
            assert rate(step) == pytest.approx(float(reference_rate(step)), abs=1e-6 * cfg.optimizer.learning_rate), step
    else:
        assert cfg.schedule.name == "constant" and rate(0) == args.learning_rate


RECIPES: dict[str, dict[str, Any]] = {
    "defaults only": {},
    "adamw with betas": {"optimizer": "adamw", "optimizer_config": {"adamw": {"betas": [0.8, 0.95], "eps": 1e-6}}},
    "adam with bias correction": {"optimizer_config": {"adam": {"bias_correction": True}}, "learning_rate": 3e-4},
    "sgd with nesterov": {
        "optimizer": "sgd",
        "optimizer_config": {"sgd": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}, "adam": {"eps": 1e-3}},
    },
    "muon": {"optimizer": "muon", "optimizer_config": {"muon": {"ns_steps": 3}}},
    "muon defaults": {"optimizer": "Muon"},
    "adafactor": {"optimizer": "adafactor"},
    "cosine with warmup and lora": {
        "fine_tune_type": "dora",
        "num_layers": 2,
        "iters": 30,
        "val_batches": -1,
        "mask_prompt": True,
        "lora_parameters": {"rank": 4, "scale": 8.0, "dropout": 0.1, "keys": ["self_attn.q_proj"]},
        "lr_schedule": {"name": "cosine_decay", "warmup": 4, "warmup_init": 1e-7, "arguments": [2e-4, 20, 1e-6]},
        "prompt_feature": "question",
        "completion_feature": "answer",
    },
    "linear": {"iters": 25, "lr_schedule": {"name": "linear_schedule", "arguments": [1e-4, 1e-6, 25]}},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_an_imported_recipe_trains_with_what_mlx_lm_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump({"model": "some/model", "data": "some_data", **RECIPES[name]}))
    cfg, _imported = import_yaml(recipe)
    assert_trains_as_mlx_lm(cfg, mlx_lm_args(recipe, monkeypatch))


def test_every_key_of_mlx_lm_is_mapped_or_explained() -> None:
    """A key mlx-lm adds (a default, a command-line option, an optimizer) fails here until handled."""
    from mlx_lm import lora

    options = {action.dest for action in lora.build_parser()._actions if action.dest != "help"}
    assert set(lora.CONFIG_DEFAULTS) | options <= HANDLED
    (choices,) = [a.choices for a in lora.build_parser()._actions if a.dest == "optimizer"]
    assert set(choices) == set(CLASSES) == set(lora.CONFIG_DEFAULTS["optimizer_config"])
    assert set(CLASSES) == set(config_module.CHOICES[("optimizer", "name")])


def test_the_import_lists_the_defaults_it_filled(tmp_path: Path) -> None:
    recipe = tmp_path / "lora.yaml"
    recipe.write_text("model: some/model\ndata: some_data\noptimizer: adamw\n")
    result = tunetop("import-config", str(recipe), "--output", str(tmp_path / "run.toml"), check=True)
    filled = result.stdout.split("leaves out")[1].split("not carried over")[0]
    for line in (
        "training.validation_batches = 25",
        "training.steps_per_eval = 200",
        "training.clear_cache_gb = 0.0",
        "lora.model_precision = False",
        "lora.scale = 20.0",
        "optimizer.weight_decay = 0.01 (mlx.optimizers.AdamW's default",
        "data.packing = 'off'",
    ):
        assert line in filled, result.stdout
    assert "training.batch_size" not in filled  # the same in both: not listed


@pytest.mark.parametrize("optimizer", list(CLASSES))
def test_every_optimizer_mlx_lm_offers_trains(tmp_path: Path, optimizer: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from engine.session import build_trainer

    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(embedded_model_path()), "data": str(embedded_data_path()), "optimizer": optimizer,
        "iters": 3, "batch_size": 2, "learning_rate": 1e-3, "num_layers": 2,
    }))
    cfg, _imported = import_yaml(recipe)
    trainer, *_ = build_trainer(cfg, tmp_path / "adapters")
    before = [mx.array(v) for _k, v in tree_flatten(trainer.model.trainable_parameters())]
    losses = [trainer.step().loss for _ in range(3)]
    after = [v for _k, v in tree_flatten(trainer.model.trainable_parameters())]
    assert all(math.isfinite(x) for x in losses), losses
    assert any(not mx.array_equal(a, b).item() for a, b in zip(before, after, strict=True))


def test_optimizer_options_are_checked_against_the_class(tmp_path: Path) -> None:
    cfg = config_module.parse('[optimizer]\nname = "muon"\noptions = { nesterov = false, momentum = 0.5 }\n')
    assert build_optimizer(cfg.optimizer).momentum == 0.5
    cfg = config_module.parse('[optimizer]\nname = "muon"\noptions = { betas = [0.9, 0.99] }\n')
    with pytest.raises(config_module.ConfigError, match=r"optimizer.options.betas is not an argument of mlx.optimizers.Muon; its arguments: momentum"):
        build_optimizer(cfg.optimizer)
    with pytest.raises(config_module.ConfigError, match=r"'optimizer.momentum' does not apply to muon. Set muon's arguments in optimizer.options"):
        config_module.parse('[optimizer]\nname = "muon"\nmomentum = 0.9\n')
    with pytest.raises(config_module.ConfigError, match=r"optimizer.options.weight_decay: set it as optimizer.weight_decay"):
        build_optimizer(config_module.parse('[optimizer]\nname = "adamw"\noptions = { weight_decay = 0.1 }\n').optimizer)
    with pytest.raises(config_module.ConfigError, match=r"'optimizer.betas' must be two numbers in \[0, 1\)"):
        config_module.parse('[optimizer]\nbetas = [0.9, 1.5]\n')


def test_hugging_face_datasets_are_carried(tmp_path: Path) -> None:
    recipe = tmp_path / "lora.yaml"
    entry = {"path": "owner/chats", "config": {"name": "en"}, "train_split": "train[:90%]", "valid_split": "train[-10%:]",
             "chat_feature": "conversation", "mask_prompt": True}
    recipe.write_text(yaml.safe_dump({"model": "some/model", "hf_dataset": entry}))
    cfg, imported = import_yaml(recipe)
    assert cfg.data.hf_dataset == [{key: value for key, value in entry.items() if key != "mask_prompt"}]
    assert not any("hf_dataset" in note for note in imported.notes)
    recipe.write_text(yaml.safe_dump({"model": "some/model", "data": "owner/sql"}))  # no such local folder
    cfg, imported = import_yaml(recipe)
    assert cfg.data.hf_dataset == [{"path": "owner/sql", "train_split": "train", "valid_split": "valid", "test_split": "test"}]


def test_report_to_and_project_name_become_metrics(tmp_path: Path) -> None:
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump({"model": "some/model", "data": "d", "report_to": "wandb, swanlab", "project_name": "sql"}))
    cfg, imported = import_yaml(recipe)
    assert (cfg.metrics.wandb, cfg.metrics.swanlab, cfg.metrics.project) == (True, True, "sql")
    assert not any(note.startswith(("report_to", "project_name")) for note in imported.notes)
