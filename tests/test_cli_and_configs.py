"""The `mtp` command line and the shipped configs: errors before any work, --help everywhere,
every config parses and trains in a tiny version, and the README's main job runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pretrain.cli import main
from pretrain.config import ConfigError, load_config, validate_layout
from pretrain.deepspeed_config import BUCKET_ELEMENTS, deepspeed_config
from tests import dist_train_cases as cases
from tests.distributed import run_world
from tests.train_fixtures import build_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def test_every_shipped_config_parses():
    assert {"tiny-cpu", "gpt-110m", "gpt-350m"} <= set(CONFIGS)
    for name in CONFIGS:
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.train.steps > 0


@pytest.mark.parametrize("command", ["prepare", "train", "plan", "export", "generate", "eval"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mtp " + command in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
        (["--config", "configs/tiny-cpu.yaml", "model.hiden_size=3"],
         "unknown key 'hiden_size' in model; valid keys are: vocab_size, hidden_size"),
        (["--config", "configs/tiny-cpu.yaml", "train.steps=many"],
         "train.steps: expected an integer, got 'many'"),
        (["--config", "configs/tiny-cpu.yaml", "train.steps"], "is not of the form key.path=value"),
        (["--config", "configs/tiny-cpu.yaml", "parallel.pp=2", "parallel.zero_stage=2"],
         "supports ZeRO stage 1 only"),
        (["--config", "configs/tiny-cpu.yaml", "parallel.tp=3"],
         "model.num_heads = 4 is not divisible by the tensor-parallel size 3"),
        (["--config", "configs/tiny-cpu.yaml", "mtp.depth=0"], "mtp.depth = 0"),
        (["--config", "configs/tiny-cpu.yaml", "mtp_weight.boundaries_tokens=[]"],
         "needs exactly one fewer"),
        (["--config", "configs/tiny-cpu.yaml", "data.path="], "data.path is empty"),
        (["--config", "configs/tiny-cpu.yaml", "train.compile=true", "parallel.zero_stage=3"],
         "train.compile = true with parallel.zero_stage = 3"),
        (["--config", "configs/tiny-cpu.yaml", "train.init_from=runs/x", "parallel.pp=2"],
         "initialising from a model is supported with pp = 1 only"),
        (["--config", "configs/tiny-cpu.yaml", "train.compile=maybe"],
         "train.compile: 'maybe' is not a bool or 'auto'"),
        (["--config", "configs/tiny-cpu.yaml", "parallel.sequence_parallel_regather=true"],
         "parallel.sequence_parallel_regather = true without sequence parallelism"),
    ],
)
def test_bad_config_is_refused_before_any_work(args, message, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtp train: config error: ")
    assert message in err


def test_layouts_that_do_not_fit_the_world_are_refused():
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError, match=r"tp × parallel.pp = 2 × 2 = 4 does not divide the world size 6"):
        validate_layout(cfg, 6)
    lay = validate_layout(cfg, 8)
    assert (lay.tp, lay.pp, lay.dp, lay.grad_accum) == (2, 2, 2, 1)
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", ["train.global_batch_size=20"])
    with pytest.raises(ConfigError, match=r"global_batch_size = 20 is not a multiple of .* 8 × 2 = 16"):
        validate_layout(cfg, 2)


@pytest.mark.parametrize(("setting", "dp", "on_gpu", "overlap"), [
    ("auto", 1, True, False),  # one replica: nothing to reduce, bucketing is host overhead
    ("auto", 2, True, True),
    ("auto", 2, False, False),  # CPU (gloo): off unless asked for
    ("true", 1, True, True),
    ("false", 2, True, False),
])
def test_deepspeed_config_overlaps_the_reduction_only_where_there_is_one(
        setting, dp, on_gpu, overlap, monkeypatch):
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [f"parallel.overlap_comm={setting}"])
    layout = validate_layout(cfg, dp)
    zero = deepspeed_config(cfg, layout, _policy(cfg, layout, on_gpu, monkeypatch))
    zero = zero["zero_optimization"]
    assert zero.get("overlap_comm", False) is overlap
    assert zero.get("contiguous_gradients", False) is overlap
    # DeepSpeed allocates a reduction bucket even with nothing to reduce: ours, not its 500M
    assert zero["reduce_bucket_size"] == BUCKET_ELEMENTS == zero["allgather_bucket_size"]


def _policy(cfg, layout, on_gpu: bool, monkeypatch):
    """The runtime policy as a GPU machine (or the CPU) would resolve it."""
    from model import accelerator
    from pretrain.runtime import resolve_runtime

    if on_gpu:
        for name, value in (("is_cpu", False), ("triton_supported", True),
                            ("device_name", "NVIDIA H200"), ("communication_backend", "nccl"),
                            ("graphs_supported", True)):
            monkeypatch.setattr(accelerator, name, lambda v=value: v)
    return resolve_runtime(cfg, layout)


def test_deepspeed_config_keeps_the_step_free_of_timer_syncs(monkeypatch):
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml")
    layout = validate_layout(cfg, 1)
    ds = deepspeed_config(cfg, layout, _policy(cfg, layout, True, monkeypatch))
    # DeepSpeed's default throughput timer synchronises the device at every micro-batch.
    assert ds["timers"] == {"throughput": {"enabled": False}}
    from deepspeed.runtime.config import DeepSpeedConfig

    assert DeepSpeedConfig(ds).timers_config.enabled is False  # DeepSpeed reads the key


def test_print_config_shows_the_resolved_tree(capsys):
    assert main(["train", "--config", "configs/tiny-cpu.yaml", "mtp.kind=parallel", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "kind: parallel" in out and "zero_stage: 1" in out


@pytest.mark.distributed
@pytest.mark.slow
def test_every_shipped_config_trains_in_a_tiny_version(tmp_path):
    data = build_tiny_dataset(tmp_path)
    (out,) = run_world(cases.shipped_configs, 1, str(data), str(tmp_path / "runs"), CONFIGS,
                       timeout_s=300)
    for name in CONFIGS:
        assert out[name]["steps"] == [1, 2], name
        assert out[name]["ckpts"] == [2], name  # saved at exit
        assert out[name]["events"] and out[name]["events"][0].startswith("events.out.tfevents")
        assert out[name]["config_written"]


@pytest.mark.slow
def test_readme_main_job_runs_end_to_end(tmp_path):
    """scripts/quickstart.sh (the README's first command, minus the venv setup that CI already
    did) with a small step count: dataset, training, checkpoint, TensorBoard, export, and a
    short generation with the export, plain and speculative. Validation reads 2 batches, not
    the config's 8: the test checks that it runs, not its number."""
    env = dict(os.environ, MTP_SKIP_SETUP="1", MTP_DATA_DIR=str(tmp_path / "data"),
               MTP_RUN_DIR=str(tmp_path / "run"))
    res = subprocess.run(
        ["bash", "scripts/quickstart.sh", "train.steps=6", "train.log_interval=3",
         "train.eval_interval=3", "train.eval_batches=2", "checkpoint.interval=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "run"
    assert "step 6/6" in res.stdout and "validation:" in res.stdout
    assert (run / "checkpoints" / "step_00000006" / "COMPLETE.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    for f in ("config.json", "model.safetensors", "tokenizer.model", "mtp.safetensors", "mtp_config.json"):
        assert (run / "export" / f).is_file(), f
    # The last step decodes with the export, plainly and with the MTP draft (greedy: the same).
    assert "--- 'def main(args):'" in res.stdout
    assert "draft acceptance by depth" in res.stderr
    assert "; 4 drafts a round, " in res.stderr  # D = 2 and two chained: generate's default
    assert "speculative vs plain: 2/2 sequences identical" in res.stderr

    # One process for the checks below, forked with torch and the trainer already imported (each
    # command's start-up costs more than its work at this size): the export is the trained main
    # model (transformers' logits equal ours from the checkpoint); the export (main model + MTP
    # tail) and the training checkpoint generate the same text, and speculative greedy equals
    # plain greedy; `mtp eval` reports acceptance. Each command runs through the CLI's main().
    generations = [(label, str(source), extra) for label, source, extra in (
        ("ckpt-spec", run, ["--speculative"]), ("export-spec", run / "export", ["--speculative"]),
        ("export-plain", run / "export", []))]
    (done,) = run_world(_export_and_commands, 1, str(run), str(tmp_path), generations,
                        timeout_s=300)
    assert done["diff"] < 1e-4, done["diff"]
    assert done["codes"] == {"ckpt-spec": 0, "export-spec": 0, "export-plain": 0, "eval": 0}
    outs = {label: json.loads((tmp_path / f"{label}.json").read_text()) for label, _, _ in generations}
    assert outs["ckpt-spec"]["tokens"] == outs["export-spec"]["tokens"] == outs["export-plain"]["tokens"]
    assert outs["export-spec"]["speculative"]["main_forwards"] > 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert len(ev["loss_per_depth"]) == 3 and len(ev["acceptance"]["acceptance_rate"]) == 2


def _export_and_commands(rank, world, run, tmp, generations):
    """Rank function of the README test: the largest logit difference between the export (through
    transformers) and our model from the checkpoint, and the exit code of each command."""
    import torch
    import transformers

    from model import MTPLanguageModel, single_process_context
    from model.sharding import load_full_state_dict
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.export.from_checkpoint import full_state_dict_from_checkpoint

    cfg, full = full_state_dict_from_checkpoint(resolve_checkpoint(run))
    ctx = single_process_context()
    ours = MTPLanguageModel(cfg.decoder, ctx)
    load_full_state_dict(ours, full, ctx.tp_group)
    hf = transformers.LlamaForCausalLM.from_pretrained(f"{run}/export", torch_dtype=torch.float32)
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    diff = (hf(ids).logits - ours.main_logits(ids)).abs().max().item()
    codes = {}
    for label, source, extra in generations:
        codes[label] = main(["generate", source, "--prompt", "import os", "--prompt",
                             "def main(args):", "--max-new-tokens", "24", "--dtype", "fp32",
                             "--json", f"{tmp}/{label}.json", *extra])
    codes["eval"] = main(["eval", run, "--data", f"{tmp}/data", "--batches", "2", "--prompts",
                          "4", "--new-tokens", "16", "--json", f"{tmp}/eval.json"])
    return {"diff": diff, "codes": codes}


def test_exit_codes_are_stated_once_and_restated_consistently():
    """pretrain/exit_codes.py is the source; the SLURM script and its README restate them."""
    import re

    from pretrain import exit_codes

    sbatch = (REPO / "scripts/slurm/train.sbatch").read_text()
    assert re.search(rf"^EXIT_PREEMPTED={exit_codes.PREEMPTED}\b", sbatch, re.M)
    assert not re.search(r"\bexit 75\b|^\s*75\)", sbatch, re.M)  # only through the variable
    readme = (REPO / "scripts/slurm/README.md").read_text()
    for code in (exit_codes.USAGE, exit_codes.NONFINITE, exit_codes.SAVE_FAILED,
                 exit_codes.PEER_LOST, exit_codes.OUT_OF_MEMORY, exit_codes.PREEMPTED):
        assert f" {code} " in readme.split("pretrain/exit_codes.py")[1][:400]
