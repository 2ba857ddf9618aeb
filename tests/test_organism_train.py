"""``vpstudy train-organism``: training lowers the loss, is reproducible, and refuses bad input."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from helpers import snapshot
from transformers import AutoModelForImageTextToText

import vpstudy
from vpstudy.cli import main
from vpstudy.organism.model import Architecture
from vpstudy.organism.train import TrainSettings, train, training_curve

SMALL = Architecture(text_hidden=64, text_layers=1, text_intermediate=128)


def _losses(path: Path) -> list[float]:
    with (path / "train_log.csv").open() as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("organism") / request.param
    settings = TrainSettings(family=request.param, steps=20, warmup=5, eval_every=20, eval_size=4, batch_size=16)
    train(settings, out, progress=False)
    return request.param, out


def test_twenty_steps_lower_the_loss(trained):
    _, out = trained
    losses = _losses(out)
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_trained_organism_loads_both_ways(trained):
    family, out = trained
    model, processor = vpstudy.load(out)
    assert model.vpstudy_family.name == family
    again = AutoModelForImageTextToText.from_pretrained(out)
    assert type(again) is type(model)
    manifest = json.loads((out / "organism.json").read_text())
    assert manifest["settings"]["family"] == family and manifest["command"].startswith("vpstudy train-organism")
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "staging directory left behind"


def test_same_seed_same_loss_curve_other_seed_different():
    settings = TrainSettings(family="llava", steps=6, batch_size=8, arch=SMALL, seed=3)
    first, second = training_curve(settings, 4), training_curve(settings, 4)
    assert first == second
    assert training_curve(TrainSettings(family="llava", steps=6, batch_size=8, arch=SMALL, seed=4), 4) != first


def _cli(*args: str) -> list[str]:
    return ["train-organism", "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--text-layers", "1",
            "--text-hidden", "64", *args]  # fmt: skip


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "llava"
    assert main(_cli("--family", "llava", "--out", str(out), "--seed", "0")) == 0
    return out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown family", r"no organism for family 'internvl'; choose one of llava, qwen2_vl"),
        ("different model", r"holds an organism trained with other settings; pass --overwrite to replace it"),
        ("not an organism", r"directory is not empty and holds no organism; pass --overwrite"),
        ("seed not an integer", r"argument --seed: invalid int value: 'seven'"),
    ],
)
def test_bad_input_is_one_line_and_keeps_the_directory(case, message, cli_model, tmp_path, capsys):
    out, family, seed = cli_model, "llava", "1"
    if case == "unknown family":
        family = "internvl"
    elif case == "not an organism":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    elif case == "seed not an integer":
        seed = "seven"
    before = snapshot(out)
    capsys.readouterr()
    assert _exit_code(_cli("--family", family, "--out", str(out), "--seed", seed)) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("vpstudy train-organism: error: "), errors
    assert re.search(message, errors[0]), errors[0]
    assert snapshot(out) == before


def test_overwrite_replaces_a_different_model(cli_model, capsys):
    old = json.loads((cli_model / "organism.json").read_text())["settings"]["seed"]
    assert main(_cli("--family", "llava", "--out", str(cli_model), "--seed", "5", "--overwrite")) == 0
    assert json.loads((cli_model / "organism.json").read_text())["settings"]["seed"] == 5 != old
    assert "trained llava organism" in capsys.readouterr().out


def _exit_code(argv: list[str]) -> int:
    """What the console script would exit with (argparse usage errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)


def test_the_visual_mass_lever_equals_eager_attention():
    """The lever's mass of the text-only rows equals the same quantity read off transformers'
    eager attention weights (output_attentions), the oracle."""
    import torch

    from vpstudy.organism.lever import VisualMassLever
    from vpstudy.organism.tasks import TASKS, generate
    from vpstudy.organism.train import _Trainer, training_batch, v2_settings

    settings = v2_settings(arch=Architecture(text_hidden=64, text_layers=2, text_intermediate=128, patch=8),
                           batch_size=4, threads=1)  # fmt: skip
    trainer = _Trainer.fresh(settings)
    model = trainer.model.eval()
    batch = training_batch(trainer.parts.processor, model, generate(4, 5, TASKS["v2"]))
    rows = batch.pop("text_only_rows")
    visual = batch["input_ids"] == model.config.image_token_id
    with torch.no_grad(), VisualMassLever(model) as lever:
        lever.select(rows, visual, batch["attention_mask"])
        model(**batch)
        ours = lever.mass().item()
    eager = AutoModelForImageTextToText.from_config(model.config, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager.eval()(**batch, output_attentions=True).attentions
    per_layer = [(a * visual[:, None, None, :]).sum(-1).mean(1)[rows] for a in attentions]
    assert ours == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-5)
    assert rows.sum() > 0 and len(attentions) == 2


def test_v2_training_resumes_exactly_after_a_kill(tmp_path):
    """A run killed after a checkpoint and run again continues where it stopped: the same loss
    column as an uninterrupted run (here the kill is simulated by an exception after step 3)."""
    from vpstudy.organism import train as train_module
    from vpstudy.organism.train import v2_settings

    small = Architecture(text_hidden=64, text_layers=2, text_intermediate=128, patch=8)
    settings = v2_settings(arch=small, steps=5, batch_size=4, threads=1, eval_every=5, eval_size=4,
                           checkpoint_every=2)  # fmt: skip
    train(settings, tmp_path / "whole", progress=False)
    steps = train_module._Trainer.steps

    def dying(self):  # yields two steps past the first checkpoint, then dies like a killed process
        for row in steps(self):
            yield row
            if row["step"] == 3:
                raise KeyboardInterrupt

    train_module._Trainer.steps = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            train(settings, tmp_path / "resumed", progress=False)
    finally:
        train_module._Trainer.steps = steps
    assert (tmp_path / ".resumed.training" / "checkpoint.pt").is_file() and not (tmp_path / "resumed").exists()
    train(settings, tmp_path / "resumed", progress=False)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")
    assert not (tmp_path / ".resumed.training").exists()


def test_a_warm_start_computes_the_source_text_model_exactly():
    """The added layers start with zero residual outputs: on text alone, the warm-started 8-layer
    model gives the 6-layer v1 organism's logits over v1's vocabulary."""
    import torch

    from vpstudy.organism.shipped import organism_dir
    from vpstudy.organism.train import _Trainer, v2_settings

    trainer = _Trainer.fresh(v2_settings(init_from=str(organism_dir("llava")), threads=1))
    assert trainer.warm_start["layer_map"] == {0: 0, 1: 1, 2: 2, 3: None, 4: 3, 5: None, 6: 4, 7: 5}
    source, processor = vpstudy.load(organism_dir("llava"))
    ids = processor.tokenizer("<s> you see a grid of objects USER: how many red objects ? ASSISTANT: red :",
                              return_tensors="pt")["input_ids"]  # fmt: skip
    with torch.no_grad():
        ours = trainer.model.eval()(input_ids=ids).logits[..., : source.config.text_config.vocab_size]
        theirs = source(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
