"""Every `mtp` command turns user mistakes into one line on stderr, exit code 2, no traceback, and
touches nothing: a table of bad inputs per command, run in one spawned process (`mtp` called
in-process, imports paid once) against the quickstart's model — configs/tiny-cpu.yaml as shipped
(context 128, DeepSeek MTP D = 2), trained for two steps on a small dataset of the quickstart's
shape (seq_len 128, max_depth 4) and exported. The same process runs the README's usage commands
as written (paths aside) on that model, a corrupt shard skipped on request, and a run whose lock
is taken away mid-run. The `kill -9`/lock test with a real torchrun: tests/test_faults_kill.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import run_world
from tests.fault_helpers import cli_calls
from tests.train_fixtures import build_tiny_dataset

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train.steps=2", "train.eval_interval=0", "train.log_interval=1",
         "checkpoint.interval=0", "data.num_workers=0"]


def _fingerprint(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file under the roots (the lock directory aside: a live record)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and "job.lock" not in p.parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _session(rank, world, setup, cases, readme, extra, protected):
    """One process: build the model, fingerprint, run every case, fingerprint again."""
    done = {"setup": cli_calls(rank, world, setup)}
    before = _fingerprint(*map(Path, protected))
    done["cases"] = cli_calls(rank, world, cases)
    done["readme"] = cli_calls(rank, world, readme)
    done["extra"] = cli_calls(rank, world, extra)
    done["untouched"] = (before, _fingerprint(*map(Path, protected)))
    return done


def _readme_commands(run: Path, export: Path, data: Path, tmp: Path) -> list[list[str]]:
    """The README's usage block, `mtp export/generate/eval` lines, with its example paths
    replaced by the quickstart model's (the training lines stand for the fixture's run)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Usage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    block = block.replace("\\\n", " ")
    paths = {"runs/gpt-110m": str(run), "exports/gpt-110m": str(export), "data/code": str(data),
             "stats.json": str(tmp / "stats.json"), "eval.json": str(tmp / "eval.json"),
             "prompts.txt": str(tmp / "prompts.txt")}
    (tmp / "prompts.txt").write_text("import os\ndef main(args):\nclass Parser:\n")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == [".venv/bin/mtp"] and words[1] in ("export", "generate", "eval"):
            commands.append([paths.get(w, w) for w in words[1:]])
    assert [c[0] for c in commands] == ["export", "generate", "generate", "eval"], commands
    return commands


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli-errors")
    data = build_tiny_dataset(base, max_depth=4, seq_len=128, shard_samples=32)
    run, export = base / "run", base / "run" / "export"
    plain = base / "export-plain"
    tiny = ["--config", "configs/tiny-cpu.yaml", f"data.path={data}"]
    setup = [
        {"argv": ["train", *tiny, f"run_dir={run}", *TRAIN]},
        {"argv": ["export", str(run), "--out", str(export), "--with-mtp"]},
        {"argv": ["export", str(run), "--out", str(plain)]},
    ]
    from data_pipeline import load_manifest

    val = [s.path for s in load_manifest(data).shards("val")]
    assert len(val) >= 2, val
    (base / "a-file").write_text("not a directory\n")
    (base / "junk").mkdir()
    (base / "junk" / "notes.txt").write_text("keep me\n")
    no_config, bad_data = base / "export-no-config", base / "data-bad-val"
    missing = base / "nowhere"
    gen = ["generate", str(export), "--prompt", "def main("]
    ev = ["eval", str(run), "--data", str(data), "--batches", "1", "--prompts", "2"]
    # name: (argv, the one line's pattern, file surgery first)
    table = {
        # prepare
        "prepare_no_source": (["prepare", "--source", str(missing), "--out", str(base / "d1")],
                              r"--source = '\S+nowhere' is neither 'stdlib', 'pinned-code'", ()),
        "prepare_zero_seq_len": (["prepare", "--out", str(base / "d2"), "--seq-len", "0"],
                                 r"argument --seq-len: 0 is not a positive integer", ()),
        "prepare_out_is_a_file": (["prepare", "--source", str(base / "corpus"), "--out",
                                   str(base / "a-file")],
                                  r"--out = '\S+a-file' exists and is not a directory", ()),
        "prepare_other_dataset": (["prepare", "--source", str(base / "corpus"), "--out", str(data),
                                   "--vocab-size", "400", "--no-progress"],
                                  r"--out = '\S+' already holds a different dataset .*; use "
                                  r"--overwrite to replace it, or choose another --out", ()),
        "prepare_no_tokenizer": (["prepare", "--out", str(base / "d3"), "--tokenizer",
                                  str(missing)],
                                 r"--tokenizer = '\S+nowhere' is invalid; point it to an existing "
                                 r"tokenizer\.json, sentencepiece \.model", ()),
        # train
        "train_no_config": (["train", "--config", str(missing)],
                            r"config error: config file '\S+nowhere' does not exist", ()),
        "train_resume_nowhere": (["train", *tiny, f"run_dir={base / 'r1'}", "--resume",
                                  str(missing)],
                                 r"no complete checkpoint under \S+nowhere: it does not exist", ()),
        "train_resume_an_export": (["train", *tiny, f"run_dir={base / 'r2'}", "--resume",
                                    str(export)],
                                   r"no complete checkpoint under \S+export: it holds no "
                                   r"checkpoints", ()),
        "train_no_data": (["train", "--config", "configs/tiny-cpu.yaml",
                           f"data.path={missing}", f"run_dir={base / 'r3'}"],
                          r"data\.path = '\S+nowhere': no dataset manifest", ()),
        "train_run_dir_is_a_file": (["train", *tiny, f"run_dir={base / 'a-file'}"],
                                    r"run_dir = '\S+a-file' cannot be written \(\S+ is a file\)",
                                    ()),
        "train_run_dir_in_use": (["train", *tiny, f"run_dir={base / 'held'}"],
                                 r"run directory \S+held is in use by another job: pid \d+ on "
                                 r"\S+, started .*; the process is running\. Wait for that job", ()),
        "train_unknown_flag": (["train", *tiny, "--resmue", "auto"],
                               r"unrecognized arguments: --resmue( auto)? \(see `mtp train --help`\)",
                               ()),
        # plan
        "plan_gpus_not_dividing": (["plan", "--config", "configs/llama3-8b.yaml", "--gpus", "3"],
                                   r"config error: .*does not divide", ()),
        # checkpoint
        "checkpoint_bad_layout": (["checkpoint", "convert", str(run), "--layout", "tp=two",
                                   "--out", str(base / "c1")],
                                  r"--layout 'tp=two': 'tp=two' is not KEY=N with KEY one of tp, "
                                  r"pp, dp, zero", ()),
        "checkpoint_layout_does_not_fit": (["checkpoint", "convert", str(run), "--layout", "tp=3",
                                            "--out", str(base / "c2")],
                                           r"--layout tp=3: .*divisible", ()),
        "checkpoint_nowhere": (["checkpoint", "convert", str(missing), "--layout", "tp=1",
                                "--out", str(base / "c3")],
                               r"no complete checkpoint under \S+nowhere: it does not exist", ()),
        "checkpoint_out_exists": (["checkpoint", "convert", str(run), "--layout", "tp=1",
                                   "--out", str(export)],
                                  r"--out \S+export exists; choose a new directory", ()),
        # export
        "export_nowhere": (["export", str(missing), "--out", str(base / "x1")],
                           r"no complete checkpoint under \S+nowhere: it does not exist; give a "
                           r"run directory or a checkpoint directory", ()),
        "export_onto_an_export": (["export", str(run), "--out", str(export)],
                                  r"--out \S+export is not empty \(it holds an earlier export\); "
                                  r"add --overwrite to replace it", ()),
        "export_onto_the_run": (["export", str(run), "--out", str(run), "--overwrite"],
                                r"--out \S+run holds the checkpoint being exported", ()),
        "export_onto_other_files": (["export", str(run), "--out", str(base / "junk"),
                                     "--overwrite"],
                                    r"--out \S+junk holds files that are not an export", ()),
        # generate
        "generate_nowhere": (["generate", str(missing), "--prompt", "x"],
                             r"\S+nowhere does not exist; give an export directory", ()),
        "generate_export_without_config": (
            ["generate", str(no_config), "--prompt", "x"],
            r"\S+export-no-config is an incomplete export: it has model\.safetensors.* but no "
            r"config\.json; export it again",
            [("copytree", export, no_config), ("unlink", no_config / "config.json")]),
        "generate_too_many_tokens": ([*gen, "--speculative", "--max-new-tokens", "200"],
                                     r"--max-new-tokens 200 does not fit: the longest prompt "
                                     r"\(\d+ tokens\) \+ 200 \+ 2·drafts \+ 2 \(10\) = \d+ > "
                                     r"model\.max_seq_len = 128; use --max-new-tokens \d+ or less",
                                     ()),
        "generate_prompt_too_long": (["generate", str(export), "--prompt", "x = 1\n" * 200],
                                     r"the longest prompt \(\d+ tokens\) \+ 1 positions for "
                                     r"decoding leave no room .*; shorten it to 126 tokens", ()),
        "generate_no_mtp_tail": (["generate", str(plain), "--prompt", "x", "--speculative"],
                                 r"has no MTP tail to draft with .*; drop --speculative, or export "
                                 r"it again with --with-mtp", ()),
        "generate_no_prompt": (["generate", str(export)],
                               r"give --prompt TEXT or --prompt-file FILE", ()),
        "generate_prompt_file_missing": (["generate", str(export), "--prompt-file", str(missing)],
                                         r"--prompt-file \S+nowhere cannot be read \(No such "
                                         r"file", ()),
        "generate_topk_without_speculative": ([*gen, "--topk", "3"],
                                              r"--topk 3 relaxes the acceptance of speculative "
                                              r"drafts; add --speculative", ()),
        "generate_top_p": ([*gen, "--top-p", "1.5"], r"--top-p 1\.5 is not in \(0, 1\]", ()),
        "generate_draft_vocab_alone": ([*gen, "--speculative", "--draft-vocab", "8"],
                                       r"--draft-vocab needs --draft-data DATASET", ()),
        "generate_draft_vocab_plain": ([*gen, "--draft-vocab", "8", "--draft-data", str(data)],
                                       r"--draft-vocab 8 restricts speculative drafts; add "
                                       r"--speculative", ()),
        "generate_draft_vocab_too_big": ([*gen, "--speculative", "--draft-vocab", "100000",
                                          "--draft-data", str(data)],
                                         r"--draft-vocab 100000 exceeds the vocabulary of "
                                         r"--draft-data \(512\)",
                                         ()),
        "generate_draft_tokens_plain": ([*gen, "--draft-tokens", "3"],
                                        r"--draft-tokens 3 sets the drafts of speculative "
                                        r"rounds; add --speculative", ()),
        "generate_json_nowhere": ([*gen, "--json", str(missing / "out.json")],
                                  r"--json \S+out\.json: the directory \S+nowhere does not exist",
                                  ()),
        # eval
        "eval_no_room": ([*ev, "--prompt-len", "120", "--new-tokens", "64"],
                         r"--prompt-len 120 \+ --new-tokens 64 \+ 2·drafts \+ 2 \(6\) = 190 > "
                         r"model\.max_seq_len = 128; make the two add up to 122 or less", ()),
        "eval_nowhere": (["eval", str(missing), "--data", str(data)],
                         r"\S+nowhere does not exist; give an export directory", ()),
        "eval_export_without_config": (["eval", str(no_config), "--data", str(data)],
                                       r"is an incomplete export: .* no config\.json", ()),
        "eval_corrupt_shard": (
            ["eval", str(export), "--data", str(bad_data)],
            r"data error: shard \S+: has 3000 bytes but the manifest records \d+ \(truncated or "
            r"replaced\); rebuild the dataset with `mtp prepare --overwrite`, or add "
            r"--skip-corrupt to skip the shard",
            [("copytree", data, bad_data), ("truncate", bad_data / val[0].name, 3000)]),
        "eval_no_data": (["eval", str(run), "--data", str(missing)],
                         r"--data: no dataset manifest at '\S+nowhere", ()),
        "eval_prompt_longer_than_windows": ([*ev, "--prompt-len", "200"],
                                            r"--prompt-len 200 is longer than the dataset's "
                                            r"windows \(seq_len 128\)", ()),
        "eval_draft_vocab_zero": ([*ev, "--draft-vocab", "64,0"],
                                  r"argument --draft-vocab: '64,0': every value must be a positive "
                                  r"integer", ()),
        "eval_draft_vocab_too_big": ([*ev, "--draft-vocab", "600"],
                                     r"--draft-vocab 600 exceeds the vocabulary of --data "
                                     r"\(512\)", ()),
        "eval_draft_tokens_zero": ([*ev, "--draft-tokens", "0"],
                                   r"argument --draft-tokens: '0': every value must be a "
                                   r"positive integer", ()),
        "eval_zero_batches": ([*ev, "--batches", "0"],
                              r"argument --batches: 0 is not a positive integer", ()),
        "eval_no_data_flag": (["eval", str(run)],
                              r"the following arguments are required: --data", ()),
    }
    cases = [{"argv": argv, "prepare": list(prep)} for argv, _, prep in table.values()]
    skip_json, lost_run = base / "skip.json", base / "lost-run"
    extra = [
        {"argv": ["eval", str(export), "--data", str(bad_data), "--skip-corrupt", "--batches",
                  "2", "--prompts", "2", "--new-tokens", "8", "--json", str(skip_json)]},
        {"argv": ["train", *tiny, f"run_dir={lost_run}", *TRAIN, "train.steps=6",
                  "checkpoint.interval=2", "train.global_batch_size=8"],
         "trigger": {"when": str(lost_run / "checkpoints" / "step_00000002" / "COMPLETE.json"),
                     "do": "unlink", "file": str(lost_run / "job.lock" / "gen-00000001.json")}},
        {"argv": ["checkpoint", "convert", str(run), "--layout", "tp=2", "--out",
                  str(base / "converted"), "--no-progress"]},
        {"argv": [*gen, "--compare", "--draft-vocab", "64", "--draft-data", str(data),
                  "--max-new-tokens", "12", "--draft-tokens", "4", "--json",
                  str(base / "generate-draft.json")]},
        {"argv": [*ev, "--new-tokens", "12", "--draft-vocab", "64,512", "--draft-tokens", "1,4",
                  "--json",
                  str(base / "eval-draft.json")]},
    ]
    readme = [{"argv": argv} for argv in _readme_commands(run, base / "readme-export", data,
                                                          base)]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pretrain.run_lock import RunLock; "
         f"RunLock({str(base / 'held')!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        (done,) = run_world(_session, 1, setup, cases, readme, extra,
                            [str(run), str(plain), str(data)], timeout_s=600)
    finally:
        holder.kill()
        holder.wait()
    done.update(table=table, base=base, run=run, export=export, data=data, holder=holder.pid,
                skip_json=skip_json, lost_run=lost_run)
    return done


def test_the_quickstart_model_is_trained_and_exported(outcome):
    for code, _, err, _ in outcome["setup"]:
        assert code == 0, err[-3000:]
    seconds = {k: [round(c[3], 1) for c in outcome[k]]
               for k in ("setup", "cases", "readme", "extra")}
    print(f"seconds spent: {seconds}")


def test_every_bad_input_is_one_line_exit_2_and_touches_nothing(outcome):
    failures = []
    for (name, (argv, pattern, _)), (code, _, err, _) in zip(outcome["table"].items(),
                                                              outcome["cases"]):
        lines = err.splitlines()
        command = argv[0]
        ok = (code == 2 and len(lines) == 1 and "Traceback" not in err
              and lines[0].startswith(f"mtp {command}: ") and re.search(pattern, lines[0]))
        if not ok:
            failures.append(f"{name}: exit {code}, stderr:\n{err[-2000:]}")
    assert not failures, "\n\n".join(failures)
    held = dict(zip(outcome["table"], outcome["cases"]))["train_run_dir_in_use"][2]
    assert f"pid {outcome['holder']} on " in held  # the holder is named
    before, after = outcome["untouched"]
    assert before == after  # checkpoints, exports and the dataset: not a byte changed
    assert any("step_00000002" in p for p in before) and any("export" in p for p in before)
    for name in ("r1", "r2", "r3", "x1", "d1", "d2", "d3"):
        made = outcome["base"] / name
        assert not (made / "checkpoints").exists() and not (made / "config.json").exists(), name


def test_readme_usage_commands_run_on_the_quickstart_model(outcome):
    """`mtp export/generate/eval` as the README writes them, on a model whose context (128) the
    defaults of 64 + 64 tokens plus the speculative look-ahead do not fit: clipped, and said."""
    (exp, gen, cmp, ev) = outcome["readme"]
    for code, _, err, _ in (exp, gen, cmp, ev):
        assert code == 0, err[-3000:]
    assert "Traceback" not in gen[2] + cmp[2] + ev[2]
    # --compare: both modes on the same engine, greedy outputs identical (fp32 on the CPU)
    assert re.search(r"^plain: \d+ tokens", cmp[2], re.M), cmp[2]
    assert "speculative vs plain: 3/3 sequences identical" in cmp[2], cmp[2]
    assert re.search(r"^mtp eval: note: --prompt-len 61 --new-tokens 61 \(not 64 and 64\)",
                     ev[2], re.M), ev[2]
    assert "note" not in gen[2]  # a short prompt + 64 new tokens + 6 fit: nothing clipped
    stats = json.loads((outcome["base"] / "stats.json").read_text())
    assert stats["speculative"]["main_forwards"] > 0
    result = json.loads((outcome["base"] / "eval.json").read_text())
    assert (result["prompt_len"], result["new_tokens"]) == (61, 61)
    assert len(result["loss_per_depth"]) == 3 and len(result["acceptance"]["acceptance_rate"]) == 2


def test_eval_skips_a_corrupt_shard_when_asked_and_says_how_many_samples(outcome):
    code, out, err, _ = outcome["extra"][0]
    assert code == 0, err[-3000:]
    skipped = json.loads(outcome["skip_json"].read_text())["skipped_samples"]
    assert skipped > 0
    assert re.search(r"^mtp eval: warning: skipped corrupt shard \S+ \(has 3000 bytes", err, re.M)
    assert f"mtp eval: note: {skipped} samples of the val split skipped in corrupt shards" in err
    assert "loss per depth" in out


def test_a_run_whose_lock_is_taken_writes_no_further_checkpoint(outcome):
    """The lock vanishing mid-run (as when another job took it over) stops the run at its next
    checkpoint, before writing it: exit 4, one line, step 2 the newest checkpoint."""
    code, out, err, _ = outcome["extra"][1]
    assert code == 4, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and re.match(
        r"mtp train: error: the lock \S+job\.lock was taken over by another job: another job "
        r"writes run_dir = '\S+' now, so this one stops without writing checkpoint step 4", lines[0])
    complete = sorted(p.parent.name for p in outcome["lost_run"].glob("checkpoints/*/COMPLETE.json"))
    assert complete == ["step_00000002"] and "step 4/6" in out and "step 5/6" not in out


def test_start_up_is_quiet(outcome):
    """No third-party notices on the console: megatron's Transformer Engine/Apex warnings when
    `model` is imported, DeepSpeed's CPU fallback notice when a command runs (DS_ACCELERATOR
    unset, as for a user)."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = ("import model, sys; from pretrain.cli import main; "
            f"sys.exit(main(['generate', {str(outcome['export'])!r}, '--prompt', 'import os', "
            "'--max-new-tokens', '4']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--- 'import os'" in res.stdout
    # stderr holds our summary line alone; DeepSpeed's logger would print to stdout
    assert re.fullmatch(r"plain: \d tokens in [\d.]+ s \([\d.]+ tokens/s\)\n", res.stderr), res.stderr
    assert "Setting accelerator" not in res.stdout and "[WARNING]" not in res.stdout


def test_checkpoint_convert_says_what_it_did_and_leaves_the_run(outcome):
    code, out, err, _ = outcome["extra"][2]
    assert code == 0, err[-3000:]
    assert re.fullmatch(r"mtp checkpoint: converting \S+step_00000002 \(step 2, TP 1 × PP 1 × DP 1, "
                        r"ZeRO 1\) for TP 2 × PP 1 × DP 1, ZeRO 1\n", err), err
    assert re.fullmatch(r"converted step 2 to \S+converted for TP 2 × PP 1 × DP 1, ZeRO 1; resume "
                        r"with --resume \S+converted\n", out), out
    converted = outcome["base"] / "converted"
    assert sorted(p.name for p in converted.glob("state_rank*.json")) == [
        "state_rank00000.json", "state_rank00001.json"]  # one whole shard per target TP rank
    before, after = outcome["untouched"]
    assert before == after  # the run it read is unchanged


def test_a_conversion_killed_mid_write_leaves_the_source_and_is_cleared_by_the_next(
        outcome, tmp_path, capsys):
    """kill -9 after the converted shards' first file is on disk: the source is unchanged and
    still converts; the hidden temporary directory is removed by the next conversion to the
    same place (its process is gone), and nothing named --out ever appears half-written."""
    import signal
    import time

    run, out, ready = outcome["run"], tmp_path / "conv", tmp_path / "ready"
    before = _fingerprint(run)
    argv = ["checkpoint", "convert", str(run), "--layout", "tp=2", "--out", str(out),
            "--no-progress"]
    stalled = (  # the first shard file is written, then the process waits to be killed
        "import sys, time\n"
        "from pretrain import checkpoint_state as cs\n"
        "real = cs.write_safetensors\n"
        "def stall(*a, **k):\n"
        f"    real(*a, **k); open({str(ready)!r}, 'w').close(); time.sleep(600)\n"
        "cs.write_safetensors = stall\n"
        f"from pretrain.cli import main; sys.exit(main({argv!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", stalled], cwd=REPO, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() else "timeout"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    [leftover] = tmp_path.glob(".conv.tmp-*")
    assert not out.exists() and (leftover / "state_rank00000.safetensors").is_file()
    assert not (leftover / "COMPLETE.json").exists()
    assert _fingerprint(run) == before
    from pretrain.cli import main

    assert main(argv) == 0
    assert f"mtp checkpoint: removed {leftover}, left by a conversion that did not finish" \
        in capsys.readouterr().err
    assert not leftover.exists() and (out / "COMPLETE.json").is_file()
    assert not (out / "OWNER.json").exists()
    assert _fingerprint(run) == before


def test_drafts_over_a_reduced_vocabulary_keep_the_output(outcome):
    """`mtp generate --compare --draft-vocab 64 --draft-data DATA --draft-tokens 4`: drafts over
    the 64 most frequent tokens of the training split, 4 a round from a D=2 tail (its last
    module chained); greedy outputs identical to plain, and the statistics printed."""
    code, _, err, _ = outcome["extra"][3]
    assert code == 0, err[-3000:]
    assert "speculative vs plain: 1/1 sequences identical" in err, err
    assert re.search(r"^speculative: \d+ tokens .*draft acceptance by depth( [\d.]+){4}$", err,
                     re.M), err
    spec = json.loads((outcome["base"] / "generate-draft.json").read_text())["speculative"]
    assert spec["depth"] == 4 and len(spec["proposed"]) == 4


def test_eval_measures_acceptance_for_each_draft_vocabulary(outcome):
    code, out, err, _ = outcome["extra"][4]
    assert code == 0, err[-3000:]
    result = json.loads((outcome["base"] / "eval-draft.json").read_text())
    full, by_k = result["acceptance"], result["acceptance_by_draft_vocab"]
    assert set(by_k) == {"64", "512"}
    assert full["proposed"][0] > 0
    for st in by_k.values():  # the same prompts and greedy continuations, drafted differently
        assert st["proposed"][0] > 0 and st["depth"] == full["depth"]
        assert all(0 <= a <= 1 for a in st["acceptance_rate"])
    by_n = result["acceptance_by_draft_tokens"]  # fewer drafts than the depth 2, and chained
    assert {n: st["depth"] for n, st in by_n.items()} == {"1": 1, "4": 4}
    assert all(st["proposed"][0] > 0 for st in by_n.values())
    assert "  4 drafts a round: " in out, out
