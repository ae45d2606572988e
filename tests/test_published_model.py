"""A published model as the starting point: its tokenizer (a tokenizers `tokenizer.json`, or a
sentencepiece model with Llama's special ids) builds the dataset with its own ids; a Llama
checkpoint saved by transformers initialises the main model (our logits equal transformers'
before any step), MTP modules are added fresh, and the trained export loads in transformers with
the tokenizer."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import BuildConfig, build_dataset, load_manifest
from data_pipeline.build import document_order, split_validation
from data_pipeline.sources import list_directory, read_document
from data_pipeline.tokenizer import TextTokenizer
from tests.distributed import run_world
from tests.test_data_common import read_all_windows, write_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SEQ, DEPTH = 16, 2
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0,
             rms_norm_eps=1e-6)


def hf_tokenizer(out: Path, corpus: Path) -> Path:
    """A byte-level BPE in the style of GPT-2/Llama-3 tokenizers, saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|bos|>", "<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted(corpus.rglob("*.py"))], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>",
                                                eos_token="<|eot|>", pad_token="<|pad|>")
    fast.save_pretrained(out)
    return out / "tokenizer.json"


def llama_dir(out: Path, vocab: int, tied: bool, seed: int, shard: str | None = None) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied, **LLAMA)
    model = transformers.LlamaForCausalLM(cfg)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kwargs)
    return out


def run_model(vocab: int, tied: bool) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, max_seq_len=SEQ, rope_theta=50000.0, norm_eps=1e-6,
                tie_embeddings=tied, loss_chunk_tokens=24)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    base = tmp_path_factory.mktemp("published")
    corpus = write_corpus(base / "corpus", n_files=30, seed=3)
    tok_json = hf_tokenizer(base / "tokenizer", corpus)
    vocab = tokenizers.Tokenizer.from_file(str(tok_json)).get_vocab_size()
    data = base / "data"
    build_dataset(BuildConfig(source=str(corpus), out_dir=data, vocab_size=None, seq_len=SEQ,
                              max_depth=DEPTH, val_fraction=0.1, shard_samples=64,
                              tokenizer_path=tok_json, add_bos=True, num_workers=1,
                              progress=False))
    return {"base": base, "corpus": corpus, "tokenizer": tok_json, "vocab": vocab, "data": data,
            "untied": llama_dir(base / "llama-untied", vocab, False, 0),
            "tied": llama_dir(base / "llama-tied", vocab, True, 1, shard="20KB")}


def train_stream(data: Path, seq: int) -> np.ndarray:
    """The packed train token stream, rebuilt from the windows (stride seq_len)."""
    windows = read_all_windows(data, "train")
    return np.concatenate([windows[i][:seq] for i in sorted(windows)])


def test_tokenizer_json_round_trip_matches_the_tokenizers_library(published):
    m = load_manifest(published["data"])
    assert m.tokenizer_kind == "tokenizers" and m.tokenizer_name == "tokenizer.json"
    assert m.special_ids == {"pad": 0, "bos": 1, "eos": 2, "unk": None}
    assert m.data["tokenizer"]["special_tokens"]["eos"] == "<|eot|>"
    assert m.vocab_size == published["vocab"]
    lib = tokenizers.Tokenizer.from_file(str(published["tokenizer"]))
    refs = list_directory(published["corpus"], ("**/*.py",))
    val = split_validation(refs, 0.1, 0)
    expected = []
    for ref in document_order(refs, 0):
        if ref.name not in val:
            text, _ = read_document(ref, "text")
            expected += [1, *lib.encode(text, add_special_tokens=False).ids, 2]
    stream = train_stream(published["data"], SEQ)
    assert len(stream) > 500
    assert stream.tolist() == expected[:len(stream)]
    ours = TextTokenizer.from_file(m.tokenizer_path)
    text = "def f(x):\n    return x  # ünïcode\n"
    assert ours.encode(text) == lib.encode(text, add_special_tokens=False).ids
    assert ours.decode(ours.encode(text)) == text


def test_published_sentencepiece_model_keeps_its_special_ids(published, tmp_path):
    import sentencepiece as spm

    text = "\n".join(p.read_text() for p in sorted(published["corpus"].rglob("*.py")))
    out = io.BytesIO()
    # Llama's conventions: unk 0, bos 1, eos 2, no pad; a dummy prefix; identity normalisation.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.split("\n") if line]), model_writer=out,
        model_type="bpe", vocab_size=350, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", minloglevel=2)
    (tmp_path / "llama-tok").mkdir()
    (tmp_path / "llama-tok" / "tokenizer.model").write_bytes(out.getvalue())
    data = tmp_path / "data"
    m = build_dataset(BuildConfig(source=str(published["corpus"]), out_dir=data, vocab_size=None,
                                  seq_len=SEQ, max_depth=DEPTH, val_fraction=0.1,
                                  tokenizer_path=tmp_path / "llama-tok", num_workers=1,
                                  progress=False))
    assert m.special_ids == {"pad": None, "bos": 1, "eos": 2, "unk": 0}
    assert m.tokenizer_kind == "sentencepiece" and m.vocab_size == 350
    stream = train_stream(data, SEQ)
    sp = spm.SentencePieceProcessor(model_proto=out.getvalue())
    refs = list_directory(published["corpus"], ("**/*.py",))
    val = split_validation(refs, 0.1, 0)
    first = next(r for r in document_order(refs, 0) if r.name not in val)
    ids = sp.encode(read_document(first, "text")[0])
    assert stream[:len(ids) + 1].tolist() == [*ids, 2]
    with pytest.raises(ValueError, match="--eos-token 'nope' is not a piece"):
        build_dataset(BuildConfig(source=str(published["corpus"]), out_dir=tmp_path / "d2",
                                  vocab_size=None, tokenizer_path=tmp_path / "llama-tok",
                                  eos_token="nope", progress=False))


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_llama_checkpoint_as_init_gives_transformers_logits(published, variant):
    from model import MTPLanguageModel, single_process_context
    from model.config import DecoderConfig, ModelConfig, MTPConfig
    from pretrain.engine import _init_main_model

    tied = variant == "tied"
    path = published[variant]
    if tied:  # saved in several safetensors files with an index
        assert (path / "model.safetensors.index.json").is_file()
    dcfg = DecoderConfig(ModelConfig(**run_model(published["vocab"], tied)),
                         MTPConfig(kind="deepseek", depth=2))
    ctx = single_process_context()
    model = MTPLanguageModel(dcfg, ctx, seed=5)
    fresh = MTPLanguageModel(dcfg, ctx, seed=5)
    _init_main_model(model, ctx, str(path), dcfg.model)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, published["vocab"], (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.main_logits(ids), hf(ids).logits, rtol=0, atol=1e-5)
    # the MTP modules are the fresh ones; every main-model matrix came from the checkpoint
    # (norm gains start at 1 on both sides)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        if p.dim() >= 2:
            assert torch.equal(p, q) == name.startswith("tail.objective."), name


def test_a_llama_checkpoint_of_another_shape_is_refused_with_the_overrides(published):
    from model import MTPLanguageModel, single_process_context
    from model.config import DecoderConfig, ModelConfig, MTPConfig
    from pretrain.config import ConfigError
    from pretrain.engine import _init_main_model

    wrong = {**run_model(published["vocab"], False), "hidden_size": 64, "rope_theta": 10000.0}
    dcfg = DecoderConfig(ModelConfig(**wrong), MTPConfig(kind="none", depth=0))
    ctx = single_process_context()
    with pytest.raises(ConfigError, match=r"model.hidden_size = 64, the model has 32; "
                                          r"model.rope_theta = 10000.0, the model has 50000.0; "
                                          r"set model.hidden_size=32 model.rope_theta=50000.0"):
        _init_main_model(MTPLanguageModel(dcfg, ctx), ctx, str(published["untied"]), dcfg.model)


def continued_pretraining(rank, world, published, tmp):
    """World 1: `mtp train` from the published model (logits checked before any step), then
    export; returns what the parent checks."""
    from pretrain.checkpoint import resolve_checkpoint
    from pretrain.config import config_from_dict
    from pretrain.export.from_checkpoint import export_checkpoint
    from pretrain.trainer import Trainer
    from tests.train_fixtures import tiny_run

    run = tiny_run(published["data"], Path(tmp) / "run", train={"steps": 3, "seed": 11},
                   checkpoint={"interval": 0}, model=run_model(published["vocab"], False))
    run["train"]["init_from"] = str(published["untied"])
    trainer = Trainer(config_from_dict(run))
    hf = transformers.LlamaForCausalLM.from_pretrained(published["untied"],
                                                       dtype=torch.float32).eval()
    ids = torch.randint(0, published["vocab"], (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = (trainer.engine.module.main_logits(ids) - hf(ids).logits).abs().max().item()
    losses = [m["loss/main"] for m in trainer.train().losses]
    out = Path(tmp) / "export"
    export_checkpoint(resolve_checkpoint(Path(tmp) / "run"), out, with_mtp=True, dtype=None,
                      overwrite=False)
    with torch.no_grad():
        trained = trainer.engine.module.main_logits(ids)
    return {"before": before, "losses": losses, "trained_logits": trained.numpy(),
            "ids": ids.numpy(), "export": str(out)}  # numpy: torch tensors die with the process


def test_continued_pretraining_from_a_published_model_exports_for_transformers(published,
                                                                              tmp_path):
    out = run_world(continued_pretraining, 1, published, str(tmp_path), timeout_s=300)[0]
    assert out["before"] < 1e-5  # the run starts from exactly the published model
    assert len(out["losses"]) == 3 and out["losses"][-1] < out["losses"][0]
    export = Path(out["export"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.from_numpy(out["ids"])).logits,
                                   torch.from_numpy(out["trained_logits"]), rtol=0, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(export)
    lib = tokenizers.Tokenizer.from_file(str(published["tokenizer"]))
    text = "def update(node, key=None):\n    return node  # naïve\n"
    assert tok(text, add_special_tokens=False).input_ids == \
        lib.encode(text, add_special_tokens=False).ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    cfg = json.loads((export / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert (export / "mtp.safetensors").is_file()
