"""The paper's training recipe as the original code runs it (AdamW groups, learning-rate schedule, from-scratch
initialisation) and the trainer's typed, validated configuration."""

import math

import pytest
import torch

from conftest import ROOT
from initialisation import assert_original_initialisation
from flair_hf_conversion.state_dict import original_shapes
from flair_hf_training import train
from flair_hf_training.checkpoints import start_logs
from flair_hf_training.config import load_config

TINY = str(ROOT / "training" / "configs" / "tiny_cpu.yaml")


def original_exempt(name: str, ndim: int) -> bool:
    """The original's no-weight-decay predicate (ExplainableML/flair src/main.py), on the original parameter names."""
    return ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def test_weight_decay_groups_equal_the_originals():
    model = train.build_model(load_config(["--config", TINY]))
    decay, no_decay = train.parameter_groups(model, 0.5)
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    shapes = original_shapes(model.config)  # the original's names (fused q/k/v): compare element counts
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in shapes.values())
    assert sum(p.numel() for p in decay["params"]) == sum(math.prod(s) for n, s in shapes.items() if not original_exempt(n, len(s)))
    assert sum(p.numel() for p in no_decay["params"]) == sum(math.prod(s) for n, s in shapes.items() if original_exempt(n, len(s)))
    decayed = {id(p) for p in decay["params"]}
    for name in ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                 "vision_model.embeddings.position_embedding.weight", "vision_model.embeddings.patch_embedding.weight"):  # fmt: skip
        assert id(model.get_parameter(name)) in decayed, name


def test_learning_rate_is_the_originals_step_by_step():
    # open_clip's cosine_lr as the original calls it before step s = 0, 1, ... (warmup 3, 8 steps, lr 1e-3)
    expected = [0.3333, 0.6667, 1.0, 1.0, 0.9045, 0.6545, 0.3455, 0.0955]
    assert [round(train.learning_rate(s, 1e-3, 3, 8) * 1e3, 4) for s in range(8)] == expected
    assert train.learning_rate(0, 1e-3, 0, 4) == 1e-3


def test_from_scratch_initialisation_is_the_originals():
    """ViT-B/16 FLAIR from its config, as the trainer builds one from scratch."""
    from flair_hf import FlairConfig, FlairModel

    torch.manual_seed(0)
    assert_original_initialisation(FlairModel(FlairConfig()))


def test_options_are_parsed_by_type_from_the_command_line_and_yaml(tmp_path):
    config = load_config(["--config", TINY, "--lr", "1e-4", "--eps", "1e-6", "--weight-decay", "1e-2", "--grad-clip-norm", "1",
                                "--gradient-checkpointing", "true", "--caption-keys", "raw_caption,longSV_captions"])  # fmt: skip
    assert (config.lr, config.eps, config.weight_decay, config.grad_clip_norm) == (1e-4, 1e-6, 1e-2, 1.0)
    assert isinstance(config.grad_clip_norm, float) and config.gradient_checkpointing is True
    assert config.caption_keys == ["raw_caption", "longSV_captions"]
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nbeta2: 9.8e-1\nbatch_size: 16\nmax_steps: null\n")  # YAML 1.1 reads 1e-3 as a string
    config = load_config(["--config", str(tmp_path / "c.yaml")])
    assert (config.lr, config.beta2, config.batch_size, config.max_steps) == (1e-3, 0.98, 16, None)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
        (["--captions-per-image", "0"], "error: --captions-per-image must be at least 1, got 0"),
        (["--max-steps", "0"], "error: --max-steps must be at least 1, got 0"),
        (["--lr=-1e-4"], "error: --lr must be at least 0, got -0.0001"),
        (["--lr", "fast"], "error: --lr 'fast' is not a float"),
        (["--batch-size", "2.5"], "error: --batch-size 2.5 is not a int"),
        (["--mixed-precision", "fp8"], "error: --mixed-precision 'fp8': choose from auto, no, bf16, fp16"),
        (["--add-tcs-loss", "false", "--add-mps-loss", "false"], "error: --add-tcs-loss false needs --add-mps-loss true"),
        (["--model-config", "{text_config: {hiden_size: 32}}"], "error: unknown key 'hiden_size' in model_config.text_config (did you mean hidden_size?)"),
        (["--model-config", "{projection: 8}"], "error: unknown key 'projection' in model_config (did you mean projection_dim?)"),
    ],
)
def test_bad_options_are_one_line_errors(args, message):
    with pytest.raises(SystemExit) as error:
        load_config(["--config", TINY, *args])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--max-steps", "null", "--grad-clip-norm", "none"], {"max_steps": None, "grad_clip_norm": None}),
        (["--caption-keys", "[raw_caption, longSV_captions]"], {"caption_keys": ["raw_caption", "longSV_captions"]}),
        (["--tf32", "0", "--add-mps-loss", "yes"], {"tf32": False, "add_mps_loss": True}),
        (["-q"], {"quiet": True}),
        (["--quiet", "false"], {"quiet": False}),
    ],
)
def test_null_lists_and_booleans(args, expected):
    config = load_config(["--config", TINY, *args])
    assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "[1"], "error: --batch-size '[1' is not valid YAML (int expected)"),
        (["--grad-clip-norm", "0"], "error: --grad-clip-norm must be positive, got 0.0"),
        (["--lr", "nan"], "error: --lr must be a finite number, got nan"),
        (["--model-config", "{projection_dim: 30, pooling_num_attention_heads: 8}"], "error: model_config: projection_dim (30) is not a multiple"),
    ],
)
def test_more_bad_options_are_one_line_errors(args, message):
    with pytest.raises(SystemExit) as error:
        load_config(["--config", TINY, *args])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_resumed_logs_keep_each_step_once_and_drop_a_torn_line(tmp_path):
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    (tmp_path / "losses.jsonl").write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 6)) + '{"step": 6, "lo')
    start_logs(tmp_path, tmp_path / "checkpoints" / "step_2", 2)
    assert (tmp_path / "losses.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 1.0}\n'
    assert not (tmp_path / "checkpoints" / "step_4").exists()  # an abandoned continuation


def test_fused_adamw_gives_the_per_tensor_loops_update():
    """`--fused-adamw` (default true) picks torch's fused kernel, `false` torch's default (the original's call, a
    per-tensor loop on CPU); three fused steps equal the loop's (foreach=False) to a few float32 ulps."""
    plain = load_config(["--config", TINY, "--fused-adamw", "false"])
    unfused = train.build_optimizer(train.build_model(plain), plain)
    assert not unfused.defaults["fused"] and not unfused.defaults["foreach"]
    config = load_config(["--config", TINY, "--lr", "1e-3"])
    model = train.build_model(config)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    reference = train.build_model(config)
    reference.load_state_dict(model.state_dict())
    optimizer = train.build_optimizer(model, config)
    loop = torch.optim.AdamW(
        train.parameter_groups(reference, config.weight_decay), lr=1e-3, betas=(config.beta1, config.beta2),
        eps=config.eps, foreach=False,
    )  # fmt: skip
    assert optimizer.defaults["fused"] is True
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
            q.grad = p.grad.clone()
        optimizer.step()
        loop.step()
    eps = torch.finfo(torch.float32).eps
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert not torch.equal(p, initial[name]), name
        torch.testing.assert_close(p, q, rtol=4 * eps, atol=4 * eps, msg=name)
