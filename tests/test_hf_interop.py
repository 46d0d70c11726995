"""Hugging Face interoperability against transformers itself (tiny random configs, no downloads):
HF -> dist-train -> HF gives the same logits (1e-5) and the same config, for Llama (default RoPE, llama3
scaling, GQA, tied, head_dim != d/h) and Mistral with a sliding window; a windowed dist-train model exports
as Mistral; every config field is mapped or refused; each refusal is one line and exit 2; training with
cp=2 from an import starts at HF's loss on the same batch."""
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from dist_train.checkpoint import hf
from dist_train.checkpoint.manager import CheckpointManager
from dist_train.cli import main
from dist_train.config import ModelConfig, ffn_hidden_size
from dist_train.data.datasets import SyntheticTokenDataset
from dist_train.models.gpt import GPT
from tests.dist_harness import run_ranks
from tests.trainer_utils import tiny_gpt_config

transformers = pytest.importorskip("transformers")

SEQ, VOCAB = 40, 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            initializer_range=0.15, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {  # name -> (config class, its kwargs beyond BASE)
    "llama": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama3_gqa": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=LLAMA3)),
    "tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "head_dim": ("LlamaConfig", dict(head_dim=12, num_key_value_heads=2)),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=6)),
}
IGNORE_IN_COMPARE = {"_name_or_path", "transformers_version"}


def _tokens(seed=0, batch=2):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _hf_model(case: str, **extra):
    cls, kw = CASES[case]
    torch.manual_seed(11)
    config = getattr(transformers, cls)(**{**BASE, **kw, **extra})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _gpt_from(ckpt) -> GPT:
    tensors, body = hf.load_model_tensors(ckpt)
    model = GPT(hf.saved_model_config(body, str(ckpt))).eval()
    model.load_state_dict(tensors, strict=True)
    return model


def _gpt_logits(model, tokens):
    with torch.no_grad():
        return model.logits(tokens, torch.arange(tokens.shape[1]))


def _config(path) -> dict:
    d = transformers.AutoConfig.from_pretrained(str(path)).to_dict()
    return {k: v for k, v in d.items() if k not in IGNORE_IN_COMPARE}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_dist_train_to_hf(case, tmp_path):
    src = _hf_model(case)
    src.save_pretrained(tmp_path / "src")
    tokens = _tokens()
    want = _hf_logits(src, tokens)
    ckpt = hf.from_hf(tmp_path / "src", tmp_path / "dt")
    ours = _gpt_from(ckpt)
    assert (_gpt_logits(ours, tokens) - want).abs().max().item() < 1e-5
    hf.to_hf(ckpt, tmp_path / "back")
    back = _load_hf(tmp_path / "back")
    assert type(back) is type(src)
    assert (_hf_logits(back, tokens) - want).abs().max().item() < 1e-5
    assert _config(tmp_path / "back") == _config(tmp_path / "src")


def test_the_cases_exercise_what_they_name(tmp_path):
    """A converter that dropped the llama3 scaling, the window or head_dim would fail the round trip."""
    tokens = _tokens()
    plain = _hf_logits(_hf_model("llama3_gqa", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), tokens)
    assert (plain - _hf_logits(_hf_model("llama3_gqa"), tokens)).abs().max() > 1e-3
    full = _hf_logits(_hf_model("mistral_window", sliding_window=None), tokens)
    assert (full - _hf_logits(_hf_model("mistral_window"), tokens))[:, 6:].abs().max() > 1e-3
    m = hf.model_config_from_hf(_hf_model("head_dim").config.to_dict())
    assert (m.head_dim, m.d_model // m.n_heads, m.attention_window) == (12, 8, None)
    assert hf.model_config_from_hf(_hf_model("mistral_window").config.to_dict()).attention_window == 5


def test_transformers_4_rope_layout_reads_the_same(tmp_path):
    """Older config.json: rope_theta at the top and rope_scaling beside it ("type" or "rope_type")."""
    new = _hf_model("llama3_gqa").config.to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    scaling = {k: v for k, v in LLAMA3.items() if k not in ("rope_theta", "rope_type")}
    for spelling in ("type", "rope_type"):
        old.update(rope_theta=10000.0, rope_scaling={spelling: "llama3", **scaling})
        assert hf.model_config_from_hf(old) == hf.model_config_from_hf(new)
    old.update(rope_theta=250.0, rope_scaling=None)
    m = hf.model_config_from_hf(old)
    assert (m.rope_theta, m.rope_scaling) == (250.0, None)
    assert hf.model_config_from_hf({**old, "hidden_act": "swish"}) == m  # transformers' other name for SiLU


def _save_dist_train(m: ModelConfig, root, seq_len=SEQ):
    torch.manual_seed(3)
    model = GPT(m, init_seed=5)
    ckpt_cfg = type("C", (), dict(every=0, keep_last=1, async_save=False, resume="none", dir=str(root), on_error="stop"))
    mgr = CheckpointManager(ckpt_cfg, run_dir=root, config={"model": dataclasses.asdict(m), "data": {"seq_len": seq_len}},
                            layout={"world_size": 1})
    mgr.save_tensors(0, {k: v.detach() for k, v in model.state_dict().items()})
    return model.eval(), root / "step_0"


def test_windowed_dist_train_model_exports_as_mistral(tmp_path):
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, attention_window=5, init_std=0.15,
                    rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})
    ours, ckpt = _save_dist_train(m, tmp_path / "dt")
    hf.to_hf(ckpt, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] == 6
    tokens = _tokens(1)
    theirs = _load_hf(tmp_path / "hf")
    assert (_hf_logits(theirs, tokens) - _gpt_logits(ours, tokens)).abs().max().item() < 1e-5
    assert hf.model_config_from_hf(config) == dataclasses.replace(m, ffn_hidden=ffn_hidden_size(m))  # the way back
    plain = dataclasses.replace(m, attention_window=None, rope_scaling=None)
    _, ckpt = _save_dist_train(plain, tmp_path / "dt2")
    hf.to_hf(ckpt, tmp_path / "hf2")
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in config


def _field_sets():
    return [set(hf.MAPPED), set(hf.REQUIRED), set(hf.KEPT), set(hf.IGNORED)]


@pytest.mark.parametrize("cls", ["LlamaConfig", "MistralConfig"])
def test_every_config_field_is_mapped_required_kept_or_ignored(cls):
    sets = _field_sets()
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            assert not a & b, a & b
    fields = set(getattr(transformers, cls)().to_dict())
    assert fields <= set().union(*sets), fields - set().union(*sets)
    assert all(reason for reason in {**hf.KEPT, **hf.IGNORED}.values())


REFUSALS = [  # (config.json change, words the one-line message must contain)
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type = 'yarn'"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type = 'linear'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "'dynamic'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"rope_parameters": {**LLAMA3, "low_freq_factor": 5.0}}, "high_freq_factor"),
    ({"rope_theta": 123.0}, "disagrees"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"hidden_act": "relu"}, "only computes hidden_act = 'silu' or 'swish'"),
    ({"attention_bias": True}, "attention_bias = True"),
    ({"mlp_bias": True}, "mlp_bias = True"),
    ({"attention_dropout": 0.1}, "attention_dropout = 0.1"),
    ({"quantization_config": {"quant_method": "gptq"}}, "'quantization_config'"),
    ({"model_type": "qwen2"}, "model_type = 'qwen2'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"num_key_value_heads": 1}, "has shape"),  # the weights no longer match the config
    ({"num_key_value_heads": 3}, "divisible by KV heads"),
    ({"sliding_window": 0}, "sliding_window = 0"),
]


@pytest.mark.parametrize("change,words", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_each_refusal_is_one_line_exit_2(change, words, tmp_path, capsys):
    _hf_model("llama").save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    config = json.loads(path.read_text())
    config.update(change)
    path.write_text(json.dumps(config))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["ckpt", "convert", str(tmp_path / "src"), "--from", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def _train_from_import(rank, world, run_dir, model: dict, resume: str):
    from dist_train.trainer import train

    cfg = tiny_gpt_config(run_dir, steps=1, model=model, data={"seq_len": SEQ}, train={"peak_tflops": 1.0},
                          parallel={"cp": 2, "cp_layout": "zigzag"}, checkpoint={"resume": resume})
    return train(cfg).losses


@pytest.mark.slow
def test_training_from_an_import_with_cp2_starts_at_hf_loss(tmp_path):
    src = _hf_model("llama3_gqa", head_dim=12, tie_word_embeddings=True)
    src.save_pretrained(tmp_path / "src")
    ckpt = hf.from_hf(tmp_path / "src", tmp_path / "init")
    model = dataclasses.asdict(hf.saved_model_config(hf.load_model_tensors(ckpt)[1], "import"))
    losses = run_ranks(_train_from_import, 2, args=(str(tmp_path / "run"), model, str(tmp_path / "init")), timeout=240)
    cfg = tiny_gpt_config(tmp_path / "x", model=model, data={"seq_len": SEQ})
    data = SyntheticTokenDataset(VOCAB, SEQ, cfg.run.seed)
    seqs = torch.stack([data[i] for i in range(cfg.train.global_batch)])
    with torch.no_grad():
        logits = src(input_ids=seqs[:, :-1]).logits
    want = F.cross_entropy(logits.flatten(0, 1), seqs[:, 1:].flatten()).item()
    for rank_losses in losses:
        assert abs(rank_losses[0] - want) <= 1e-5 * want, (rank_losses, want)


@pytest.mark.parametrize("model,words", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "model.rope_scaling.rope_type = 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "exactly the keys"),
    ({"rope_scaling": {**{k: v for k, v in LLAMA3.items() if k != "rope_theta"}, "factor": -1}}, "positive numbers"),
    ({"head_dim": 7}, "model.head_dim = 7: must be even"),
    ({"d_model": 30, "head_dim": None}, "model.head_dim"),
])
def test_model_config_refuses_bad_head_dim_and_rope_scaling(model, words, tmp_path):
    from dist_train.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_gpt_config(tmp_path, model=model)
    assert words in str(e.value) and "\n" not in str(e.value)
    tiny_gpt_config(tmp_path, model={"d_model": 30, "head_dim": 8})  # head_dim frees d_model from n_heads


def _config_without(case: str, key: str, tmp_path) -> tuple[dict, dict]:
    """(config.json of ``case`` without ``key``, the full config transformers builds when it loads that file)."""
    _hf_model(case).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.pop(key, None)
    path.write_text(json.dumps(config))
    return config, transformers.AutoConfig.from_pretrained(str(tmp_path)).to_dict()


def _read(config: dict):
    try:
        return hf.model_config_from_hf(config)
    except ValueError as e:
        return f"refused: {e}"


@pytest.mark.parametrize("case", ["llama", "mistral_window"])
def test_a_missing_field_is_read_as_transformers_reads_it(case, tmp_path):
    """config.json may omit any field (hand-written, or trimmed): transformers then uses its class default (a
    Mistral without sliding_window has a 4096-key window, not none), so the import must build the model of the
    config transformers loads, field by field."""
    fields = [k for k in json.loads(_hf_model(case).config.to_json_string()) if k not in
              ("model_type", "architectures", "transformers_version")]
    for i, key in enumerate(fields):
        trimmed, theirs = _config_without(case, key, tmp_path / str(i))
        assert _read(trimmed) == _read(theirs), key


@pytest.mark.parametrize("case,change,words", [
    ("llama", {"sliding_window": 6}, "model_type llama: LlamaForCausalLM does not apply it"),
    ("mistral_window", {"use_sliding_window": False}, "MistralForCausalLM does not read use_sliding_window"),
])
def test_a_window_field_transformers_does_not_apply_is_refused(case, change, words, tmp_path):
    """transformers computes LlamaForCausalLM without a window whatever config.json's sliding_window says, and
    MistralForCausalLM with its window whatever use_sliding_window says: importing either as written would train
    another model than the one the file holds (measured: logits differ by ~5 on 40 tokens)."""
    src = _hf_model(case)
    src.save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    theirs = _load_hf(tmp_path / "src")  # what transformers computes from that file: the saved model, unchanged
    tokens = _tokens()
    assert (_hf_logits(theirs, tokens) - _hf_logits(src, tokens)).abs().max().item() == 0
    with pytest.raises(ValueError) as info:
        hf.from_hf(tmp_path / "src", tmp_path / "out")
    assert words in str(info.value) and "\n" not in str(info.value), info.value
    assert not (tmp_path / "out").exists()


def test_a_tied_config_over_a_distinct_lm_head_is_refused(tmp_path):
    """tie_word_embeddings: true over a file whose lm_head.weight differs from embed_tokens: transformers 5 then
    does NOT tie them (it warns and keeps both; older versions tie them), so dropping lm_head as the import does
    for a tied model changed the model (measured: logits differ by ~4.9). An lm_head equal to the embedding is
    the tied model itself and converts."""
    src = _hf_model("llama")
    src.save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tie_word_embeddings": True}))
    with pytest.raises(ValueError) as info:
        hf.from_hf(tmp_path / "src", tmp_path / "out")
    assert "lm_head.weight differs from model.embed_tokens.weight" in str(info.value), info.value
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()

    with torch.no_grad():
        src.lm_head.weight.copy_(src.model.embed_tokens.weight)  # the same values: a tied model stored twice
    src.save_pretrained(tmp_path / "same")
    path = tmp_path / "same" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tie_word_embeddings": True}))
    tokens = _tokens()
    ours = _gpt_from(hf.from_hf(tmp_path / "same", tmp_path / "out2"))
    assert ours.cfg.tie_embeddings
    assert (_gpt_logits(ours, tokens) - _hf_logits(_load_hf(tmp_path / "same"), tokens)).abs().max().item() < 1e-5


def _random_llama(seed: int):
    model = _hf_model("llama")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("layout", ["single_and_stray", "index_and_stale_single", "index_only", "index_and_stray"])
def test_the_weight_files_read_are_the_ones_transformers_reads(layout, tmp_path):
    """A directory may hold more *.safetensors than the model's: a stale single file beside a sharded save, a stray
    copy. transformers reads model.safetensors when it exists, else the shards model.safetensors.index.json names;
    the import read every *.safetensors and let the last one (by name) win. It now reads exactly what transformers
    reads (equal logits), and a tensor in two of the files it reads is refused."""
    src, other = tmp_path / "src", tmp_path / "other"
    main_model, stray = _random_llama(1), _random_llama(2)
    stray.save_pretrained(other)
    main_model.save_pretrained(src, max_shard_size="20KB" if layout.startswith("index") else "1GB")
    if layout == "single_and_stray":
        shutil.copy(other / "model.safetensors", src / "zz-copy.safetensors")
    elif layout == "index_and_stale_single":
        shutil.copy(other / "model.safetensors", src / "model.safetensors")
    elif layout == "index_and_stray":
        shutil.copy(other / "model.safetensors", src / "zz-copy.safetensors")
    tokens = _tokens()
    want = _hf_logits(_load_hf(src), tokens)
    ours = _gpt_from(hf.from_hf(src, tmp_path / "out"))
    assert (_gpt_logits(ours, tokens) - want).abs().max().item() < 1e-5


def test_a_tensor_in_two_weight_files_is_refused(tmp_path):
    src = tmp_path / "src"
    _random_llama(1).save_pretrained(src)
    (src / "model.safetensors").rename(src / "a.safetensors")  # no single file, no index: every file is read
    shutil.copy(src / "a.safetensors", src / "b.safetensors")
    with pytest.raises(ValueError, match=r"is in both a.safetensors and b.safetensors"):
        hf.from_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_saved_rotary_cache_is_checked_against_the_rope_settings(dtype, tmp_path):
    """Older transformers saved each layer's ``rotary_emb.inv_freq`` with the weights (in the model's dtype after
    ``.half()``); transformers ignores it and recomputes it from config.json. One that config.json's rope settings
    give converts to the same model; one from another rope_theta (weights trained with another RoPE than
    config.json says) is refused in one line."""
    from safetensors.torch import load_file, save_file

    src = _hf_model("llama")
    src.save_pretrained(tmp_path / "src")
    weights = tmp_path / "src" / "model.safetensors"
    tensors = load_file(str(weights))
    head_dim = BASE["hidden_size"] // BASE["num_attention_heads"]
    theta = CASES["llama"][1]["rope_parameters"]["rope_theta"]
    for theta_saved, out in ((theta, "same"), (theta * 2, "other")):
        cache = 1.0 / (theta_saved ** (torch.arange(0, head_dim, 2).float() / head_dim))
        caches = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": cache.to(dtype).clone()
                  for i in range(BASE["num_hidden_layers"])}
        (tmp_path / out).mkdir()
        shutil.copy(tmp_path / "src" / "config.json", tmp_path / out / "config.json")
        save_file({**tensors, **caches}, str(tmp_path / out / "model.safetensors"))
    tokens = _tokens()
    ours = _gpt_from(hf.from_hf(tmp_path / "same", tmp_path / "out_same"))
    assert (_gpt_logits(ours, tokens) - _hf_logits(src, tokens)).abs().max().item() < 1e-5
    with pytest.raises(ValueError) as info:
        hf.from_hf(tmp_path / "other", tmp_path / "out_other")
    assert "rotary_emb.inv_freq (a saved RoPE cache) differs" in str(info.value), info.value
    assert "\n" not in str(info.value) and not (tmp_path / "out_other").exists()


def test_a_fine_tune_of_an_import_exports_the_fields_the_import_kept(tmp_path):
    """config.json's KEPT fields (token ids, max_position_embeddings) came back only from the import itself: a run
    resumed from it recorded its own config, so exporting the fine-tune wrote null token ids (generation would not
    stop at EOS) and max_position_embeddings = data.seq_len (40 instead of 4096: a server caps the context there)."""
    from dist_train.trainer import train

    kept = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=4096)
    _hf_model("llama", **kept).save_pretrained(tmp_path / "src")
    ckpt = hf.from_hf(tmp_path / "src", tmp_path / "init")
    model = dataclasses.asdict(hf.saved_model_config(hf.load_model_tensors(ckpt)[1], "import"))
    for steps in (1, 2):  # the import's fields go on through a restart of the fine-tune (resume: auto)
        train(tiny_gpt_config(tmp_path / "run", steps=steps, model=model, data={"seq_len": SEQ},
                              checkpoint={"resume": str(tmp_path / "init"), "restart": True, "at_end": True}))
    hf.to_hf(tmp_path / "run" / "checkpoints" / "step_2", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: config[k] for k in kept} == kept, config
    # trained at a longer context than the import's (context extension): the export says the length it trained at
    _hf_model("llama", **{**kept, "max_position_embeddings": 24}).save_pretrained(tmp_path / "short")
    hf.from_hf(tmp_path / "short", tmp_path / "short_init")
    train(tiny_gpt_config(tmp_path / "long", steps=1, model=model, data={"seq_len": SEQ},
                          checkpoint={"resume": str(tmp_path / "short_init"), "at_end": True}))
    hf.to_hf(tmp_path / "long" / "checkpoints" / "step_1", tmp_path / "long_hf")
    assert json.loads((tmp_path / "long_hf" / "config.json").read_text())["max_position_embeddings"] == SEQ


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "{other}/model.safetensors", "a/../../other/x"])
def test_an_index_naming_a_file_outside_the_directory_is_refused(shard, tmp_path):
    """A downloaded model.safetensors.index.json could make the import read (and keep) weights from elsewhere on
    this machine; only names inside the directory are read."""
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"")
    shard = shard.format(other=other)
    (src / hf.INDEX_FILE).write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}))
    with pytest.raises(ValueError) as e:
        hf.weight_files(src)
    assert repr(shard) in str(e.value) and "outside" in str(e.value) and "\n" not in str(e.value)
