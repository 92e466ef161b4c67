"""Training with Accelerate on CPU: one process, DDP, FSDP2 (save/resume/export), simulated two-node launch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from benchmark_layouts import build_data_root
from conftest import FIXTURES, ROOT, free_port
from flair_hf_benchmarks.synthetic import write_shard

TRAIN = str(ROOT / "training" / "train.py")
TINY = str(ROOT / "training" / "configs" / "tiny_cpu.yaml")
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    for index in range(4):
        write_shard(root / f"train-{index:04d}.tar", index * 8, 8)
    from flair_hf import FlairTokenizer

    generator = torch.Generator().manual_seed(0)
    ids = FlairTokenizer.from_bpe_vocab()(
        ["a red square", "bright", "on white", "a blue circle", "small", "centered"], padding="max_length", max_length=77, return_tensors="pt"
    )["input_ids"]
    save_file({"pixel_values": torch.randn(2, 3, 32, 32, generator=generator), "input_ids": ids}, root / "eval_batch.safetensors")
    build_data_root(root / "benchmarks")
    return root


def train_args(data, output, *extra):
    return [TRAIN, "--config", TINY, "--train-data", f"{data}/train-{{0000..0003}}.tar", "--train-num-samples", "32",
            "--eval-batch", str(data / "eval_batch.safetensors"), "--output-dir", str(output), *extra]  # fmt: skip


def run(command, env_extra=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-6000:])
    return result


def launch(config_file, args, env_extra=None, launch_args=()):
    env = {"ACCELERATE_USE_CPU": "true", **(env_extra or {})}
    return run(ACCELERATE + ["--config_file", str(ROOT / "training" / "accelerate" / config_file),
                             "--main_process_port", str(free_port()), *launch_args, *args], env)  # fmt: skip


def losses(output):
    return [json.loads(line)["loss"] for line in (output / "losses.jsonl").read_text().splitlines()]


def summary(output):
    return json.loads((output / "summary.json").read_text())


def eval_records(output):
    return [json.loads(line) for line in (output / "eval.jsonl").read_text().splitlines()]


def eval_args(data, every):
    return ["--eval-benchmarks", "coco,flickr30k", "--eval-data-root", str(data / "benchmarks"), "--eval-every-steps", str(every)]


def assert_export_runs_with_its_processor(export_dir):
    """AutoModel + AutoProcessor on an exported directory score a real image (processor matches the model's size)."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    import flair_hf

    flair_hf.register_auto_classes()

    model, processor = AutoModel.from_pretrained(export_dir).eval(), AutoProcessor.from_pretrained(export_dir)
    size = model.config.vision_config.image_size
    inputs = processor(text=["a puppy", "a door"], images=Image.open(FIXTURES / "images" / "puppy.jpg"))
    assert tuple(inputs["pixel_values"].shape) == (1, 3, size, size)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits_per_image).all()


def assert_eval_equals_cli(output, data, tmp_path):
    """The last in-training evaluation equals the single-process retrieval CLI on the exported checkpoint."""
    from flair_hf_benchmarks import evaluate_retrieval

    cli = evaluate_retrieval.main(["--model", str(output / "final"), "--benchmark", "coco", "--benchmark", "flickr30k",
                                   "--data-root", str(data / "benchmarks"), "--output", str(tmp_path / "cli.json")])  # fmt: skip
    last = {record["benchmark"]: record for record in eval_records(output) if record["step"] == summary(output)["steps"]}
    for result in cli:
        assert last[result["benchmark"]]["metrics"] == result["metrics"], result["benchmark"]


def test_single_process_training_lowers_the_loss_on_a_fixed_batch(data, tmp_path):
    run([sys.executable] + train_args(data, tmp_path / "run", "--max-steps", "8", "--lr", "0.003", "--grad-clip-norm", "10"))
    result = summary(tmp_path / "run")
    assert result["world_size"] == 1 and result["steps"] == 8
    assert result["eval_loss"] < result["initial_eval_loss"] - 0.5, result
    assert len(losses(tmp_path / "run")) == 8
    assert_export_runs_with_its_processor(tmp_path / "run" / "final")


def test_accumulation_checkpointing_and_tensorboard_logging(data, tmp_path):
    import yaml

    model_config = {**yaml.safe_load(open(TINY))["model_config"], "logit_scale_init_value": 5.0}  # exp(5) > 100
    extra = ["--max-steps", "2", "--gradient-accumulation-steps", "2", "--gradient-checkpointing", "true",
             "--report-to", "tensorboard", "--checkpoint-every", "2", "--model-config", json.dumps(model_config),
             *eval_args(data, 1)]  # fmt: skip
    run([sys.executable] + train_args(data, tmp_path / "run", *extra))
    assert summary(tmp_path / "run")["steps"] == 2 and len(losses(tmp_path / "run")) == 2
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"loss", "eval/coco/text_to_image_R@1", "eval/flickr30k/image_to_text_R@10"} <= set(tags), tags
    assert [(r["step"], r["benchmark"]) for r in eval_records(tmp_path / "run")] == [
        (1, "coco"), (1, "flickr30k"), (2, "coco"), (2, "flickr30k")
    ]
    step = json.loads((tmp_path / "run" / "losses.jsonl").read_text().splitlines()[-1])
    assert {"lr", "logit_scale", "logit_bias", "samples_per_second_per_device", "data_wait_seconds"} <= set(step)
    assert step["logit_scale"] <= 100.0 + 1e-3  # clamped to ln 100 after each step


def test_logged_loss_of_an_accumulated_step_is_the_mean_of_its_micro_batches(data, tmp_path):
    """With the weights held (lr 0), each step of 2 accumulated micro-batches logs the mean of the losses that two
    plain steps over the same batches (same order, same sampled negatives) log."""
    run([sys.executable] + train_args(data, tmp_path / "plain", "--lr", "0", "--max-steps", "4"))
    run([sys.executable] + train_args(data, tmp_path / "accumulated", "--lr", "0", "--max-steps", "2", "--gradient-accumulation-steps", "2"))
    plain, accumulated = losses(tmp_path / "plain"), losses(tmp_path / "accumulated")
    assert len(plain) == 4 and len(accumulated) == 2 and plain[0] != plain[1]
    expected = [(plain[0] + plain[1]) / 2, (plain[2] + plain[3]) / 2]
    assert accumulated == pytest.approx(expected, rel=1e-6)


def test_ddp_on_cpu_really_uses_two_processes(data, tmp_path):
    launch("ddp_cpu.yaml", train_args(data, tmp_path / "ddp", "--max-steps", "2", *eval_args(data, 5)))
    result = summary(tmp_path / "ddp")
    assert result["distributed_type"] == "DistributedType.MULTI_CPU" and result["world_size"] == 2
    assert [r["step"] for r in eval_records(tmp_path / "ddp")] == [2, 2]  # only at the end
    assert_eval_equals_cli(tmp_path / "ddp", data, tmp_path)


def test_the_global_loss_baseline_trains_under_ddp(data, tmp_path):
    """`--add-tcs-loss false` leaves the pooling head without gradients, which DDP must be told of (else step 2 fails)."""
    launch("ddp_cpu.yaml", train_args(data, tmp_path / "ddp", "--max-steps", "3", "--add-tcs-loss", "false"))
    result = summary(tmp_path / "ddp")
    assert result["world_size"] == 2 and result["steps"] == 3 and len(losses(tmp_path / "ddp")) == 3


@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_fsdp2_resume_equals_uninterrupted_run_and_export_loads(data, tmp_path, state_dict_type):
    options = {"launch_args": ["--fsdp_state_dict_type", state_dict_type]}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # evaluation one item per batch: rank 0's shards (8 texts, 2 images) need more batches than rank 1's (7, 1)
    eval_options = [*eval_args(data, 3), "--eval-batch-size", "1"]
    launch("fsdp2.yaml", train_args(data, whole, "--max-steps", "6", "--checkpoint-every", "3", *eval_options), **options)
    sharded = (whole / "checkpoints" / "step_3" / "pytorch_model_fsdp_0").is_dir()
    assert sharded == (state_dict_type == "SHARDED_STATE_DICT"), sorted(p.name for p in (whole / "checkpoints" / "step_3").iterdir())
    result = summary(whole)
    assert result["distributed_type"] == "DistributedType.FSDP" and result["world_size"] == 2
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(whole / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    launch("fsdp2.yaml", train_args(data, resumed, "--max-steps", "6", "--checkpoint-every", "3", "--resume", "latest"), **options)
    assert losses(resumed) == losses(whole)[3:]

    assert remote_code_eval_loss(result["export_dir"], data / "eval_batch.safetensors", tmp_path) == pytest.approx(
        result["eval_loss"], abs=1e-5
    )
    assert [r["step"] for r in eval_records(whole)] == [3, 3, 6, 6]
    assert_eval_equals_cli(whole, data, tmp_path)
    assert_export_runs_with_its_processor(whole / "final")


REMOTE_EVAL = """
import torch
import remote_code_probe  # makes flair_hf unimportable
from safetensors.torch import load_file
from transformers import AutoModel
model = AutoModel.from_pretrained({export!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert model.logit_scale.shape == () and model.logit_bias.shape == ()
torch.manual_seed(0)
with torch.no_grad():
    print(model(**load_file({batch!r}), return_loss=True, captions_per_image=3, loss_across_ranks=False).loss.item())
"""


def remote_code_eval_loss(export_dir, batch, tmp_path) -> float:
    """The exported directory's eval loss, loaded with AutoModel + remote code in a process without flair_hf."""
    code = REMOTE_EVAL.format(export=str(export_dir), batch=str(batch))
    result = run([sys.executable, "-c", code], {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT / "tests")})
    return float(result.stdout.strip().splitlines()[-1])


def test_fsdp2_gradients_with_packed_text_equal_a_single_process(tmp_path):
    """The text tower runs on packed rows cut at each rank's longest caption; under FSDP2 (2 gloo ranks, float64,
    captions of different lengths on each rank) the losses and averaged gradients equal a single process evaluating
    both ranks' batches."""
    import fsdp_packed_text_probe as probe

    output = tmp_path / "fsdp.pt"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(ROOT / "tests" / "fsdp_packed_text_probe.py"), str(output)], timeout=300)  # fmt: skip
    result = torch.load(output, weights_only=True)
    model = probe.build_model()
    losses = [probe.rank_loss(model, rank) for rank in range(2)]
    (sum(losses) / 2).backward()
    torch.testing.assert_close(result["losses"], torch.stack(losses).detach(), rtol=1e-12, atol=0)
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert result["gradients"].keys() == expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(result["gradients"][name], gradient, rtol=1e-9, atol=1e-12, msg=name)
    with torch.no_grad():  # ranks with different numbers of texts stay in step
        for rank, embeds in enumerate(result["text_embeds"]):
            torch.testing.assert_close(embeds, model.get_text_embeds(probe.texts_for_rank(rank)), rtol=1e-9, atol=1e-12)


def test_simulated_two_node_fsdp2_launch(data, tmp_path):
    port = free_port()
    common = ["--config_file", str(ROOT / "training" / "accelerate" / "fsdp2_multinode.yaml"), "--num_machines", "2",
              "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    nodes = [
        subprocess.Popen(ACCELERATE + common + ["--machine_rank", str(rank)] + train_args(data, tmp_path / "two-node", "--max-steps", "2"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    result = summary(tmp_path / "two-node")
    assert result["distributed_type"] == "DistributedType.FSDP" and result["world_size"] == 2


def test_starts_from_a_clip_checkpoint_in_hf_format(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from flair_hf_training.config import TrainConfig
    from flair_hf_training.train import build_model, build_processor, parameter_groups

    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_act": "gelu"},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "hidden_act": "gelu"},
        projection_dim=16,
    ))  # fmt: skip
    clip.save_pretrained(tmp_path / "clip")
    model = build_model(TrainConfig(model=str(tmp_path / "clip")))
    clip_state = clip.state_dict()
    for name, value in model.state_dict().items():
        if name in clip_state and name != "logit_scale":
            assert torch.equal(value, clip_state[name]), name
    assert model.logit_scale.shape == (1,) and model.logit_bias.item() == -10.0
    assert type(build_processor(TrainConfig(model=str(tmp_path / "clip")), model)).__name__ == "FlairProcessor"
    _, no_decay = parameter_groups(model, 0.5)
    assert any(p is model.logit_scale for p in no_decay["params"])


def test_resume_keeps_the_schedule_and_says_when_finished(data, tmp_path):
    output = tmp_path / "run"
    run([sys.executable] + train_args(data, output, "--max-steps", "2", "--checkpoint-every", "2", "--warmup-steps", "0"))
    lr_at_end = json.loads((output / "losses.jsonl").read_text().splitlines()[-1])["lr"]
    assert lr_at_end == pytest.approx(0.5e-3)  # the rate step 2 of 2 used: 0.5 * (1 + cos(pi / 2)) * lr
    finished = run([sys.executable] + train_args(data, output, "--max-steps", "2", "--resume", "latest"))
    assert "this run is already finished (2 of 2 steps): nothing to train" in finished.stdout
    longer = subprocess.run([sys.executable] + train_args(data, output, "--max-steps", "4", "--resume", "latest"),
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert longer.returncode != 0
    assert "the checkpoint's LR schedule ends at step 2 but --max-steps / --epochs now give 4 steps" in longer.stderr
    rebuilt = run([sys.executable] + train_args(data, output, "--max-steps", "4", "--resume", "latest", "--reset-schedule", "true", "--fused-adamw", "false"))
    assert "LR schedule rebuilt for 4 steps (was 2)" in rebuilt.stdout
    assert "AdamW keeps the checkpoint's kernel (fused: true), so the run continues as it began" in rebuilt.stdout
    assert summary(output)["steps"] == 4 and len(losses(output)) == 4


def test_help_lists_every_option_with_help_and_default():
    import dataclasses

    from flair_hf_training.config import TrainConfig

    text = run([sys.executable, TRAIN, "--help"]).stdout
    for item in dataclasses.fields(TrainConfig):
        assert item.metadata["help"]
    help_text = " ".join(text.split())
    assert "--max-steps MAX_STEPS optimizer steps in total (default: epochs x steps per epoch) --batch-size" in help_text
    assert "--lr LR peak learning rate (default: 0.0005)" in help_text


@pytest.mark.parametrize("extra, message", [
    (["--learning-rate", "0.1"], "error: unknown option --learning-rate: did you mean --lr?"),
    (["--batchsize", "3"], "error: unknown option --batchsize: did you mean --batch-size?"),
    (["--colour", "red"], "error: unknown option --colour (see --help for the options)"),
    (["--eval-benchmarks", "coco", "--eval-data-root", "/nonexistent"],
     "error: --eval-data-root /nonexistent: coco: missing annotation file /nonexistent/coco/annotations/captions_val2017.json"),
])  # fmt: skip
def test_a_mistyped_option_or_missing_eval_data_is_one_line(data, tmp_path, extra, message):
    result = subprocess.run([sys.executable] + train_args(data, tmp_path / "run", *extra), capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert result.stderr.strip().startswith(message), result.stderr
    assert not (tmp_path / "run").exists()


def test_a_rank_without_a_full_batch_is_a_clear_error_not_a_hang(data, tmp_path):
    command = [sys.executable] + train_args(data, tmp_path / "run", "--batch-size", "64", "--max-steps", "2")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "rank 0 got no full batch of 64 in epoch 0" in result.stderr


EXPECTED_LR = [0.3333, 0.6667, 1.0, 1.0, 0.9045, 0.6545, 0.3455, 0.0955]  # the original's rates, warmup 3 of 8, lr 1e-3


def test_two_processes_with_two_workers_count_every_skipped_sample_and_use_the_originals_rates(tmp_path):
    """DDP, 2 ranks x 2 DataLoader workers, one corrupt sample in each of the 4 shards (8 samples each): by the end
    of each epoch every worker has decoded its whole shard (shuffle buffer 8), so step 2 reports 4 and step 8 (four
    epochs) 16. The learning rate each step used is the original's (Accelerate must not step it once per rank)."""
    for index in range(4):
        write_shard(tmp_path / f"train-{index}.tar", index * 8, 8, corrupt_index=index * 8 + 3)
    args = [TRAIN, "--config", TINY, "--train-data", f"{tmp_path}/train-{{0..3}}.tar", "--train-num-samples", "32",
            "--workers", "2", "--max-steps", "8", "--warmup-steps", "3", "--lr", "1e-3", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    launch("ddp_cpu.yaml", args)
    records = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [round(r["lr"] * 1e3, 4) for r in records] == EXPECTED_LR
    assert (records[1]["corrupt_samples"], records[-1]["corrupt_samples"]) == (4, 16)
    assert records[-1]["corrupt_shards"] == 0 and records[-1]["unusable_captions"] == 0


def resume_from(whole, resumed, step):
    """A new output directory holding only the uninterrupted run's checkpoint of `step`; its data positions."""
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(whole / "checkpoints" / f"step_{step}", resumed / "checkpoints" / f"step_{step}")
    state = json.loads((whole / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())
    return [(p["epoch"], p["step_in_epoch"], p["batches_in_epoch"]) for p in state.get("data_positions", [])]


def test_resume_after_an_epoch_ends_inside_an_accumulated_step_replays_the_same_data(data, tmp_path):
    """32 samples = 8 micro-batches of 4 an epoch, 3 per step: step 3 takes micro-batches 6 and 7 of epoch 0 and the
    first of epoch 1, so a resume at step 3 skips 1 micro-batch of epoch 1 (not 3 steps' worth)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    options = ["--train-num-samples", "48", "--gradient-accumulation-steps", "3", "--max-steps", "5", "--checkpoint-every", "3"]
    run([sys.executable] + train_args(data, whole, *options))
    positions = resume_from(whole, resumed, 3)
    run([sys.executable] + train_args(data, resumed, *options, "--resume", "latest"))
    assert losses(resumed) == losses(whole)[3:] and len(losses(resumed)) == 2
    assert positions == [(1, 1, 1)]


def test_ranks_whose_shards_differ_in_size_each_resume_at_their_own_place(tmp_path):
    """DDP, 2 ranks x 2 workers; rank 0's shards hold 8 + 4 samples (3 micro-batches an epoch), rank 1's 8 + 8 (4).
    With 3 micro-batches a step, at step 2 rank 0 has taken 3 of epoch 1 and rank 1 2: each resumes from its own."""
    for index, count in enumerate((8, 8, 4, 8)):
        write_shard(tmp_path / f"train-{index}.tar", index * 8, count)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = [TRAIN, "--config", TINY, "--train-data", f"{tmp_path}/train-{{0..3}}.tar", "--train-num-samples", "48",
            "--workers", "2", "--gradient-accumulation-steps", "3", "--max-steps", "4", "--checkpoint-every", "2"]  # fmt: skip
    launch("ddp_cpu.yaml", args + ["--output-dir", str(whole)])
    positions = resume_from(whole, resumed, 2)
    launch("ddp_cpu.yaml", args + ["--output-dir", str(resumed), "--resume", "latest"])
    assert losses(resumed) == losses(whole)[2:] and len(losses(resumed)) == 2
    assert positions == [(1, 1, 3), (1, 1, 2)]
    one_process = subprocess.run([sys.executable] + args + ["--output-dir", str(resumed), "--resume", str(whole / "checkpoints" / "step_2")],
                                 capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert one_process.stderr.strip().splitlines()[-1] == (
        f"error: {whole / 'checkpoints' / 'step_2'} was written by 2 processes: resume it with 2, not 1"
    )


KILL_WHILE_SAVING = """
import os, signal
import accelerate

save_state = accelerate.Accelerator.save_state


def killed_after_writing(self, output_dir=None, **kwargs):
    save_state(self, output_dir, **kwargs)
    if os.path.basename(str(output_dir)).startswith(os.environ["KILL_AT_CHECKPOINT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # the state is written, the checkpoint not yet complete


accelerate.Accelerator.save_state = killed_after_writing
"""


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(data, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run([sys.executable] + train_args(data, whole, "--max-steps", "6", "--checkpoint-every", "2"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_WHILE_SAVING)
    command = [sys.executable] + train_args(data, killed, "--max-steps", "6", "--checkpoint-every", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(hook), "KILL_AT_CHECKPOINT": "step_4"}
    assert subprocess.run(command, capture_output=True, timeout=300, env=env).returncode == -9
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_2", "step_4.partial"]
    assert [json.loads(line)["step"] for line in (killed / "losses.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    resumed = run(command + ["--resume", "latest"])
    assert f"resuming from {killed / 'checkpoints' / 'step_2'}, the newest complete checkpoint" in resumed.stdout
    assert [json.loads(line)["step"] for line in (killed / "losses.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert losses(killed) == losses(whole)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]


def test_a_new_run_never_overwrites_an_old_one_unless_asked(data, tmp_path):
    output = tmp_path / "run"
    run([sys.executable] + train_args(data, output, "--max-steps", "1"))
    again = subprocess.run([sys.executable] + train_args(data, output, "--max-steps", "1"), capture_output=True, text=True,
                           timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: {output} already holds a run (checkpoints, losses.jsonl, summary.json, final): pass --resume latest to "
        "continue it, --overwrite true to start over, or another --output-dir"
    )
    missing = subprocess.run([sys.executable] + train_args(data, output, "--resume", str(tmp_path / "nothing")), capture_output=True,
                             text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert missing.stderr.strip().splitlines()[-1] == f"error: --resume {tmp_path / 'nothing'}: no such checkpoint directory (or pass --resume latest)"
    run([sys.executable] + train_args(data, output, "--max-steps", "2", "--overwrite", "true"))
    assert len(losses(output)) == 2 and sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_2"]


@pytest.mark.parametrize("config_file", ["single.yaml", "ddp_cpu.yaml"])
def test_unusable_data_is_one_line_under_accelerate_launch(tmp_path, config_file):
    """Captions in keys the trainer does not read, read by 2 DataLoader workers: under `accelerate launch -q` the run
    stops with one line that says what was expected and found, the first error line the user sees, with no traceback;
    in one process it is also the last line."""
    for index in range(2):
        write_shard(tmp_path / f"train-{index}.tar", index * 8, 8, captions={"text": "a photo"})
    args = [TRAIN, "--config", TINY, "--train-data", f"{tmp_path}/train-{{0..1}}.tar", "--train-num-samples", "16",
            "--workers", "2", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(ACCELERATE + ["-q", "--config_file", str(ROOT / "training" / "accelerate" / config_file),
                                          "--main_process_port", str(free_port()), *args],
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() and "errors.html" not in line]
    assert errors[0] == (
        "error: all 8 training samples are unusable: no usable captions: expected a .json with one of the keys raw_caption, "
        "shortIB_captions, longIB_captions, shortSV_captions, longSV_captions, shortLLA_captions, longLLA_captions "
        "(--caption-keys) or a 'caption' string, or a .txt caption; found sample fields jpg, json and json keys text"
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if config_file == "single.yaml":
        assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
