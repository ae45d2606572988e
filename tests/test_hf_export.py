"""Export to Hugging Face Llama + MTP tail, and loading back (pretrain/export/).

transformers must load the export and give our logits; loading back must rebuild the identical
model (main + MTP tail) with identical losses; every failure mode gets a clear ValueError and a
crash never leaves a half-written export.
"""

from __future__ import annotations

import io
import json
import os

import pytest
import safetensors.torch
import torch

from model import MTPLanguageModel, single_process_context
from model.sharding import load_full_state_dict
from pretrain.export.files import export_main_model, export_mtp_tail, load_exported_model
from pretrain.export.hf_llama import hf_shapes, main_shapes, to_hf_tensors
from tests.model_fixtures import KINDS, make_batch, randomize_, tiny_config

# The export is meant for machines without network: nothing here may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")



def build(dcfg, seed=0):
    torch.manual_seed(seed)
    model = MTPLanguageModel(dcfg, single_process_context())
    randomize_(model, seed=seed + 3)
    return model


def full_sd(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_tokenizer(tmp_path):
    """A tiny sentencepiece BPE with the project's settings (data_pipeline/tokenizer.py)."""
    text = (open(json.__file__).read() + open(io.__file__).read())[:20000]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.split("\n") if line]), model_writer=out,
        model_type="bpe", vocab_size=400, byte_fallback=True, character_coverage=0.9999,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=True, user_defined_symbols=["\n"], minloglevel=2)
    path = tmp_path / "tok.model"
    path.write_bytes(out.getvalue())
    return path


# --- transformers loads the export and computes our logits ------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(num_kv_heads=2, rope_theta=500000.0, norm_eps=1e-6),  # untied, GQA (2 q heads per kv)
    dict(num_kv_heads=None, tie_embeddings=True),  # tied, plain multi-head
], ids=["untied_gqa", "tied_mha"])
def test_transformers_llama_gives_our_logits(tmp_path, overrides):
    dcfg = tiny_config("deepseek", 1, **overrides)
    model = build(dcfg)
    export_main_model(tmp_path / "hf", full_sd(model), dcfg)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", torch_dtype=torch.float32, local_files_only=True).eval()
    assert hf.config.tie_word_embeddings == dcfg.model.tie_embeddings
    # Every position of the rotary table, so a RoPE layout or base mismatch cannot hide.
    ids = torch.randint(0, dcfg.model.vocab_size, (2, dcfg.model.max_seq_len),
                        generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, model.main_logits(ids), rtol=0, atol=1e-5)


def test_bfloat16_export_keeps_values_and_dtype(tmp_path):
    dcfg = tiny_config("blockwise", 1)
    sd = full_sd(build(dcfg))
    export_main_model(tmp_path / "hf", sd, dcfg, dtype=torch.bfloat16, include_mtp=True)
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"
    _, loaded = load_exported_model(tmp_path / "hf")
    for name, t in sd.items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], t.to(torch.bfloat16)), name


# --- round trip: export, load back, rebuild ---------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_rebuilds_identical_model_and_losses(tmp_path, kind):
    dcfg = tiny_config(kind, 2)
    dcfg.mtp.options = ({"detach_trunk": True} if kind == "deepseek" else
                        {"sample_one_loss": True} if kind == "blockwise" else {})
    model = build(dcfg)
    sd = full_sd(model)
    main_dir = tmp_path / "main"
    # Three ways to place the tail: in one atomic export, added next to the main model, or in a
    # directory of its own.
    export_main_model(main_dir, sd, dcfg, include_mtp=kind == "deepseek",
                      metadata={"step": 1234, "run": "unit"})
    mtp_dir = None
    if kind == "parallel":
        export_mtp_tail(main_dir, sd, dcfg)
    elif kind == "blockwise":
        mtp_dir = export_mtp_tail(tmp_path / "tail", sd, dcfg, metadata={"step": 1234})

    loaded_cfg, loaded = load_exported_model(main_dir, mtp_dir=mtp_dir)
    assert loaded_cfg == dcfg
    rebuilt = MTPLanguageModel(loaded_cfg, single_process_context())
    load_full_state_dict(rebuilt, loaded, single_process_context().tp_group)
    for name, p in rebuilt.named_parameters():
        assert torch.equal(p, sd[name]), name
    batch = make_batch(2)
    want = model(*batch, mtp_weight=0.3, step=7)
    got = rebuilt(*batch, mtp_weight=0.3, step=7)
    assert torch.equal(got.loss, want.loss)
    # NaN marks the blockwise depths not sampled this step; they must match too.
    torch.testing.assert_close(got.depth_loss, want.depth_loss, rtol=0, atol=0, equal_nan=True)
    meta = json.loads((main_dir / "export_metadata.json").read_text())
    assert meta["source"] == {"step": 1234, "run": "unit"}


def test_main_only_export_loads_without_tail(tmp_path):
    dcfg = tiny_config("parallel", 1)
    sd = full_sd(build(dcfg))
    export_main_model(tmp_path / "m", sd, dcfg)
    loaded_cfg, loaded = load_exported_model(tmp_path / "m")
    assert loaded_cfg.mtp.kind == "none" and loaded_cfg.mtp.depth == 0
    assert set(loaded) == set(main_shapes(dcfg))


@pytest.mark.parametrize("tied", [False, True])
def test_hf_shape_table_matches_the_conversion(tied):
    """The HF shape table that loading validates against is what the conversion writes."""
    dcfg = tiny_config("none", 0, tie_embeddings=tied, num_kv_heads=1)
    hf = to_hf_tensors(full_sd(build(dcfg)), dcfg.model)
    assert {n: tuple(t.shape) for n, t in hf.items()} == hf_shapes(dcfg.model)


# --- what the files hold ----------------------------------------------------------------------

def test_files_hold_the_right_tensors(tmp_path):
    dcfg = tiny_config("deepseek", 2)
    sd = full_sd(build(dcfg))
    export_main_model(tmp_path / "m", sd, dcfg)
    export_mtp_tail(tmp_path / "t", sd, dcfg)
    tail = safetensors.torch.load_file(tmp_path / "t/mtp.safetensors")
    assert tail and all(n.startswith("tail.objective.") for n in tail)
    assert set(tail) == {n for n in sd if n.startswith("tail.objective.")}
    main = safetensors.torch.load_file(tmp_path / "m/model.safetensors")
    assert all(n.startswith(("model.", "lm_head.")) for n in main)
    assert "lm_head.weight" in main and len(main) == 3 + 9 * dcfg.model.num_layers
    cfg = json.loads((tmp_path / "t/mtp_config.json").read_text())
    assert (cfg["kind"], cfg["depth"], cfg["model"]["hidden_size"]) == ("deepseek", 2, 32)
    assert sorted(os.listdir(tmp_path)) == ["m", "t"]  # no temporary directories left


def test_tied_export_has_no_lm_head(tmp_path):
    dcfg = tiny_config("none", tie_embeddings=True)
    export_main_model(tmp_path / "m", full_sd(build(dcfg)), dcfg)
    assert "lm_head.weight" not in safetensors.torch.load_file(tmp_path / "m/model.safetensors")
    assert json.loads((tmp_path / "m/config.json").read_text())["tie_word_embeddings"] is True


# --- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_loads_offline_and_encodes_like_sentencepiece(tmp_path):
    tok_path = train_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    dcfg = tiny_config("none", vocab_size=512)
    export_main_model(tmp_path / "m", full_sd(build(dcfg)), dcfg, tokenizer_model_path=tok_path)
    texts = ["def f(x):\n    return x + 12345\n", "  two leading spaces", " one",
             "héllo wörld ☃ 日本語", "\n\n\tclass A:\n        pass\n", "a  b   c"]
    for cls in (transformers.AutoTokenizer, transformers.LlamaTokenizer):
        tok = cls.from_pretrained(tmp_path / "m", local_files_only=True)
        for text in texts:
            ids = tok.encode(text)
            assert ids == sp.encode(text), (cls.__name__, text)
            assert tok.decode(ids) == text
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1, 2)
    gen = json.loads((tmp_path / "m/generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_tokenizer_errors(tmp_path):
    tok_path = train_tokenizer(tmp_path)
    dcfg = tiny_config("none")  # vocab 96 < the tokenizer's 400 pieces
    sd = full_sd(build(dcfg))
    with pytest.raises(ValueError, match="400 pieces but model.vocab_size is 96"):
        export_main_model(tmp_path / "a", sd, dcfg, tokenizer_model_path=tok_path)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        export_main_model(tmp_path / "b", sd, dcfg, tokenizer_model_path=bad)
    with pytest.raises(ValueError, match=r"special_token_ids\['eos'\] = 500"):
        export_main_model(tmp_path / "c", sd, dcfg, special_token_ids={"eos": 500})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- refusals ---------------------------------------------------------------------------------

def test_kind_none_has_no_tail_to_export(tmp_path):
    dcfg = tiny_config("none")
    sd = full_sd(build(dcfg))
    with pytest.raises(ValueError, match="mtp.kind = 'none'"):
        export_mtp_tail(tmp_path / "t", sd, dcfg)
    with pytest.raises(ValueError, match="mtp.kind = 'none'"):
        export_main_model(tmp_path / "m", sd, dcfg, include_mtp=True)
    assert not os.listdir(tmp_path)


def test_tail_of_another_model_shape_is_refused(tmp_path):
    small, wide = tiny_config("deepseek", 1), tiny_config("deepseek", 1, ffn_hidden_size=48)
    export_main_model(tmp_path / "m", full_sd(build(small)), small)
    export_mtp_tail(tmp_path / "t", full_sd(build(wide)), wide)
    with pytest.raises(ValueError, match="different model shape.*ffn_hidden_size: tail 48 vs model 40"):
        load_exported_model(tmp_path / "m", mtp_dir=tmp_path / "t")
    with pytest.raises(ValueError, match="different model shape"):
        export_mtp_tail(tmp_path / "m", full_sd(build(wide)), wide)
    assert not (tmp_path / "m/mtp.safetensors").exists()


def test_non_empty_out_dir_is_refused_unless_overwrite(tmp_path):
    dcfg = tiny_config("deepseek", 1)
    sd = full_sd(build(dcfg))
    out = tmp_path / "m"
    out.mkdir()
    export_mtp_tail(out, sd, dcfg)  # an existing empty directory is fine
    assert sorted(os.listdir(out)) == ["mtp.safetensors", "mtp_config.json"]
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
        export_main_model(out, sd, dcfg)
    with pytest.raises(ValueError, match="is not empty"):
        export_mtp_tail(out, sd, dcfg)
    assert sorted(os.listdir(out)) == ["keep.txt", "mtp.safetensors", "mtp_config.json"]
    export_main_model(out, sd, dcfg, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    export_mtp_tail(out, sd, dcfg)
    with pytest.raises(ValueError, match="already holds an MTP tail"):
        export_mtp_tail(out, sd, dcfg)
    export_mtp_tail(out, sd, dcfg, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_crash_mid_write_leaves_no_export(tmp_path, monkeypatch):
    dcfg = tiny_config("deepseek", 1)
    sd = full_sd(build(dcfg))
    export_main_model(tmp_path / "old", sd, dcfg)
    before = (tmp_path / "old/model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_main_model(tmp_path / "new", sd, dcfg)
    with pytest.raises(RuntimeError, match="disk full"):
        export_main_model(tmp_path / "old", sd, dcfg, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        export_mtp_tail(tmp_path / "old", sd, dcfg)  # added in place next to the main model
    with pytest.raises(RuntimeError, match="disk full"):
        export_mtp_tail(tmp_path / "tail", sd, dcfg)
    assert sorted(os.listdir(tmp_path)) == ["old"]  # no half export, no temporary leftovers
    assert sorted(os.listdir(tmp_path / "old")) == [
        "config.json", "export_metadata.json", "generation_config.json", "model.safetensors"]
    assert (tmp_path / "old/model.safetensors").read_bytes() == before


def test_state_dict_that_does_not_fit_the_config_is_refused(tmp_path):
    dcfg = tiny_config("deepseek", 1)
    sd = full_sd(build(dcfg))
    del sd["blocks.1.mlp.down.weight"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.down.weight'\]"):
        export_main_model(tmp_path / "m", sd, dcfg)
    sd = full_sd(build(dcfg))
    sd["tail.objective.layers.0.proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match=r"wrong shape.*proj.weight: \(32, 32\) \(expected \(32, 64\)\)"):
        export_mtp_tail(tmp_path / "t", sd, dcfg)
    assert not os.listdir(tmp_path)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    (dict(attention_bias=True), "attention_bias = True cannot be represented"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     "rope_parameters.rope_type = 'llama3'"),
    (dict(model_type="mistral"), "model_type = 'mistral'"),
    (dict(head_dim=16), "head_dim = 16"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu'"),
])
def test_config_json_we_cannot_represent_is_refused(tmp_path, changes, message):
    dcfg = tiny_config("none")
    export_main_model(tmp_path / "m", full_sd(build(dcfg)), dcfg)
    edit_config(tmp_path / "m", **changes)
    with pytest.raises(ValueError, match=message):
        load_exported_model(tmp_path / "m")


def test_missing_files_and_wrong_shapes_are_refused(tmp_path):
    dcfg = tiny_config("parallel", 1)
    sd = full_sd(build(dcfg))
    export_main_model(tmp_path / "m", sd, dcfg, include_mtp=True)
    with pytest.raises(ValueError, match="is not a directory"):
        load_exported_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no MTP tail"):
        load_exported_model(tmp_path / "m", mtp_dir=tmp_path)
    (tmp_path / "m/mtp_config.json").unlink()
    with pytest.raises(ValueError, match="incomplete: mtp_config.json is missing"):
        load_exported_model(tmp_path / "m")
    (tmp_path / "m/mtp.safetensors").unlink()
    edit_config(tmp_path / "m", intermediate_size=48)
    with pytest.raises(ValueError, match=r"wrong shape.*gate_proj.weight: \(40, 32\) \(expected \(48, 32\)\)"):
        load_exported_model(tmp_path / "m")
    (tmp_path / "m/model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds neither model.safetensors"):
        load_exported_model(tmp_path / "m")
    (tmp_path / "m/config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_exported_model(tmp_path / "m")
