"""benchmarks/mtp_study.py end to end on CPU with a tiny model: arms run, the frozen-trunk arm
really starts from and keeps the baseline's trunk, and the report holds every arm's numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

from tests.train_fixtures import SEQ, VOCAB, build_tiny_dataset, tiny_run

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # whole training/export/eval runs in subprocesses
STUDY = [sys.executable, str(REPO / "benchmarks" / "mtp_study.py")]


STUDY_ARGS = ["--steps", "6", "--curve-points", "2", "--eval-batches", "2", "--prompts", "2",
              "--prompt-len", "12", "--new-tokens", "6"]


@pytest.fixture(scope="module")
def gpu_study(tmp_path_factory):
    """benchmarks/study_gpu.sh on a pack of real code (the tiny dataset's stdlib packages), two
    lanes at the same time: 'deepseek1' and 'none', 6 steps each. Both tests read it: the script's
    own checks, and the study's arms (the frozen-trunk arm then trains on this 'none')."""
    tmp = tmp_path_factory.mktemp("gpu-study")
    data = build_tiny_dataset(tmp / "cfgdata", max_depth=4)
    res = subprocess.run([*STUDY, "pack", "--source", str(tmp / "cfgdata" / "corpus"),
                          "--out", str(tmp / "real"), "--max-mib", "8"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    cfg = tiny_run(data, tmp / "unused")
    cfg["model"]["max_seq_len"] = 64  # room for prompt + new tokens at evaluation
    cfg["data"]["num_workers"] = 0
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out, work = tmp / "out", tmp / "work"
    # Out of distribution: one stdlib package outside the pack, not the whole stdlib (17M tokens
    # at this vocabulary, two thirds of the fixture's time) for arms that read 2 batches of it.
    ood = Path(sysconfig.get_paths()["stdlib"]) / "logging"
    env = {**__import__("os").environ, "OUT": str(out), "PACK": str(tmp / "real"),  # STEPS: --steps
           "WORK": str(work), "LANES": "deepseek1 none", "STEPS": "6", "VOCAB": str(VOCAB),
           "SEQ_LEN": str(SEQ), "PYTHON": sys.executable, "OOD_SOURCE": str(ood)}
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "study_gpu.sh"), "--config",
                          str(config), *STUDY_ARGS[2:]], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=900)
    return {"res": res, "out": out, "work": work, "config": config, "cfg": cfg,
            "pack": json.loads((tmp / "real" / "pack.json").read_text())}


def test_study_arms_and_report(gpu_study, tmp_path, monkeypatch):
    res = gpu_study["res"]
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    cfg, work = gpu_study["cfg"], gpu_study["work"]
    study = work / "study"  # the arms' full directories (exports included)
    common = ["--data", str(work / "data"), "--ood-data", str(work / "ood"), "--config",
              str(gpu_study["config"]), *STUDY_ARGS]

    # The frozen-trunk arm needs the baseline first and says so (the script's main() in this
    # process, on a study directory without one: it refuses before any work).
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its `import provenance`
    spec = importlib.util.spec_from_file_location("_mtp_study", REPO / "benchmarks" / "mtp_study.py")
    study_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study_module)
    monkeypatch.setattr(study_module, "_destroy_process_group", lambda: None)  # none was made
    with pytest.raises(SystemExit, match="run that arm first"):
        study_module.main(["run", "blockwise4-frozen", *common, "--out", str(tmp_path / "empty")])
    assert not (tmp_path / "empty" / "blockwise4-frozen" / "result.json").exists()
    # 'none' and 'deepseek1' ran in the script's lanes; the frozen arm trains on that 'none'.
    res = subprocess.run([*STUDY, "run", "blockwise4-frozen", *common, "--out", str(study)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
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
            gen = r["generation"]
            assert gen["plain"]["tokens_per_s"] > 0 and gen["round_cost"] > 0
            assert gen["identical_sequences"] == gen["sequences"] == 1  # greedy, fp32
            assert gen["requests"] == 1 and gen["plain"]["first_request_ms"] > 0
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
    for png in ("loss_curves.png", "acceptance_by_depth.png"):
        assert (page.parent / "study-plots" / png).stat().st_size > 1000
        assert f"study-plots/{png}" in text


def test_pack_and_the_offline_gpu_script(gpu_study, tmp_path):
    """pack: a deterministic budgeted subset; study_gpu.sh: unpack, shards, two lanes of arms."""
    src = tmp_path / "src"
    for i in range(300):  # ~6 MiB of incompressible-ish Python, so the budget bites
        body = "".join(f"x_{i}_{j} = {hash((i, j)) % 10**12}\n" for j in range(900))
        (src / f"pkg{i % 7}").mkdir(parents=True, exist_ok=True)
        (src / f"pkg{i % 7}" / f"m{i}.py").write_text(body)
    packs = []
    for name in ("a", "b"):
        res = subprocess.run([*STUDY, "pack", "--source", str(src), "--out", str(tmp_path / name),
                              "--max-mib", "2"], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 0, res.stderr
        packs.append(json.loads((tmp_path / name / "pack.json").read_text()))
    a, b = packs
    assert a["files_total"] == 300 and 0 < a["files_kept"] < 300  # the budget cut the list
    assert a["compressed_bytes"] <= 2.2 * 2**20
    assert (tmp_path / "a" / "corpus.tar.xz").read_bytes() == (tmp_path / "b" / "corpus.tar.xz").read_bytes()

    # The script on a pack of real code (the tiny dataset's stdlib packages): the shared run.
    res, out, real = gpu_study["res"], gpu_study["out"], gpu_study["pack"]
    assert real["files_kept"] == real["files_total"]  # within budget: everything
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for arm, lane in (("deepseek1", 0), ("none", 1)):  # two lanes, at the same time
        r = json.loads((out / "study" / arm / "result.json").read_text())
        assert r["steps"] == 6 and set(r["eval"]) == {"in_distribution", "out_of_distribution"}
        assert f"arm {arm} done" in (out / f"lane-{lane}.log").read_text()
    manifest = json.loads((gpu_study["work"] / "data" / "manifest.json").read_text())
    assert manifest["source"]["documents_listed"] == real["files_kept"]
