"""benchmarks/mtp_study.py end to end on CPU with a tiny model: arms run, the frozen-trunk arm
really starts from and keeps the baseline's trunk, and the report holds every arm's numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tests.train_fixtures import SEQ, VOCAB, build_tiny_dataset, tiny_run

REPO = Path(__file__).resolve().parent.parent
STUDY = [sys.executable, str(REPO / "benchmarks" / "mtp_study.py")]


def _ood_dataset(root: Path, tokenizer: Path) -> Path:
    """A different source (this project's data_pipeline package), the training tokenizer."""
    from data_pipeline import BuildConfig, build_dataset

    out = root / "ood"
    build_dataset(BuildConfig(source=str(REPO / "data_pipeline"), out_dir=out, vocab_size=VOCAB,
                              seq_len=SEQ, max_depth=4, val_fraction=0.5, shard_samples=256,
                              num_workers=1, progress=False, tokenizer_path=tokenizer))
    return out


def test_study_arms_and_report(tmp_path):
    data = build_tiny_dataset(tmp_path, max_depth=4)
    ood = _ood_dataset(tmp_path, data / "tokenizer.model")
    cfg = tiny_run(data, tmp_path / "unused")
    cfg["model"]["max_seq_len"] = 64  # room for prompt + new tokens at evaluation
    cfg["data"]["num_workers"] = 0
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    study = tmp_path / "study"
    common = ["--data", str(data), "--ood-data", str(ood), "--out", str(study), "--config",
              str(config), "--steps", "6", "--curve-points", "2", "--eval-batches", "2",
              "--prompts", "2", "--prompt-len", "12", "--new-tokens", "6"]

    # The frozen-trunk arm needs the baseline first and says so.
    res = subprocess.run([*STUDY, "run", "blockwise4-frozen", *common], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode != 0 and "run that arm first" in res.stderr
    for arm in ("none", "deepseek1", "blockwise4-frozen"):
        res = subprocess.run([*STUDY, "run", arm, *common], capture_output=True, text=True,
                             cwd=REPO, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]

    results = {a: json.loads((study / a / "result.json").read_text())
               for a in ("none", "deepseek1", "blockwise4-frozen")}
    for arm, r in results.items():
        assert r["steps"] == 6 and r["tokens"] == 6 * cfg["train"]["global_batch_size"] * SEQ
        assert len(r["validation_curve"]) == 2  # steps 3 and 6
        for split in ("in_distribution", "out_of_distribution"):
            loss = r["eval"][split]["loss_per_depth"][0]
            assert math.isfinite(loss) and 0 < loss < 2 * math.log(VOCAB)
        if arm == "none":
            assert r["generation"] is None and "acceptance" not in r["eval"]["in_distribution"]
        else:
            acc = r["eval"]["in_distribution"]["acceptance"]
            assert len(acc["acceptance_rate"]) == (1 if arm == "deepseek1" else 4)
            assert 1.0 <= acc["mean_tokens_per_forward"] <= 1 + len(acc["acceptance_rate"])
            assert r["generation"]["plain_tokens_per_s"] > 0
            assert r["generation"]["identical_sequences"] == "2/2"  # greedy, fp32
    # λ follows DeepSeek's 0.3 → 0.1 at 70 % of the token budget.
    assert "mtp_weight.values=[0.3, 0.1]" in results["deepseek1"]["overrides"]

    # The frozen arm's trunk is the baseline's, unchanged by its training.
    from safetensors.torch import load_file

    base = load_file(str(study / "none" / "export" / "model.safetensors"))
    frozen = load_file(str(study / "blockwise4-frozen" / "export" / "model.safetensors"))
    assert base.keys() == frozen.keys()
    for name in base:
        torch.testing.assert_close(frozen[name], base[name], rtol=0, atol=0, msg=name)
    joint = load_file(str(study / "deepseek1" / "export" / "model.safetensors"))
    assert any(not torch.equal(joint[n], base[n]) for n in base)  # a trained trunk differs

    reading = tmp_path / "reading.md"
    reading.write_text("What the numbers say.")
    page = tmp_path / "docs" / "STUDY.md"
    page.parent.mkdir()
    res = subprocess.run([*STUDY, "report", str(study), "--out", str(page), "--reading",
                          str(reading)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    text = page.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "arm" not in ln]
    assert [r.split("|")[1].strip() for r in rows] == ["none", "deepseek1", "blockwise4-frozen"]
    main_loss = results["deepseek1"]["eval"]["in_distribution"]["loss_per_depth"][0]
    assert f"{main_loss:.3f}" in rows[1]
    assert "## Reading" in text and "What the numbers say." in text
    for png in ("validation_loss.png", "acceptance_by_depth.png"):
        assert (page.parent / "study-plots" / png).stat().st_size > 1000
        assert f"study-plots/{png}" in text
