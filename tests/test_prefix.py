"""The frozen-prefix cache: the cached path against the full forward, per architecture and on SmolLM2."""

import contextlib

import pytest
import torch
import transformers

from loramix import prefix
from loramix.archs import ARCHS
from loramix.data import make_batches
from loramix.errors import UsageError
from loramix.layers import inject_trainable

from .test_archs import CONFIGS

PREFIX_ARCHS = [a for a in ARCHS if ARCHS[a].prefix_cache]


def _tiny(model_type: str, layers: int = 4):
    cfg = CONFIGS[model_type]()
    key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    setattr(cfg, key, layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[0]] * layers
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _examples(vocab: int, lengths=(7, 3, 12, 5), seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    return out


@contextlib.contextmanager
def _counting_block_0(model):
    """A list that gets one entry per forward pass through block 0 while open."""
    ran: list[int] = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, args: ran.append(1))
    try:
        yield ran
    finally:
        handle.remove()


def _not_served(tmp_path, monkeypatch, model, ex, cached: dict, asked: dict) -> None:
    """States computed with the batching ``cached`` and cached (in memory; on
    disk only) are not served to a run asking ``asked``: it runs as many
    batches as a fresh computation and gets that computation's bits."""
    with _counting_block_0(model) as fresh_batches:
        own = prefix.compute_states(model, 2, ex, **asked)
    assert fresh_batches, "the prefix ran no batch: the test shows nothing"
    for where in ("memory", "disk"):
        monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path / where))
        prefix.clear_memory()
        prefix.prefix_states(model, 2, ex, **cached)
        if where == "disk":
            prefix.clear_memory()
        with _counting_block_0(model) as ran:
            got = prefix.prefix_states(model, 2, ex, **asked)
        assert len(ran) == len(fresh_batches), f"{where}: states batched by {cached} served to {asked}"
        assert all(torch.equal(a, b) for a, b in zip(got, own, strict=True)), where
    prefix.clear_memory()


def _full_and_cached(model, k: int, examples):
    """Logits at real positions and the loss, from the full model and from the cached path."""
    states = prefix.compute_states(model, k, examples, batch_size=3)
    full = make_batches(examples, batch_size=4, pad_id=0)[0]
    cached = make_batches(examples, batch_size=4, pad_id=0, embeds=states)[0]
    top = prefix.top_view(model, k)
    with torch.no_grad():
        a = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"], labels=full["labels"])
        b = top(inputs_embeds=cached["inputs_embeds"], attention_mask=cached["attention_mask"],
                labels=cached["labels"])  # fmt: skip
    real = full["attention_mask"].bool()
    return a.logits[real], b.logits[real], a.loss, b.loss


@pytest.mark.parametrize("model_type", PREFIX_ARCHS)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_cached_path_equals_the_full_forward(model_type, k):
    model = _tiny(model_type)
    la, lb, a, b = _full_and_cached(model, k, _examples(model.config.vocab_size))
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-5)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_with_trainable_adapters_on_the_top_layers_the_gradients_agree():
    model = _tiny("llama")
    k = 2
    names = prefix.top_targets(model, None, k)
    assert names and all(prefix.layer_of(model, n) >= k for n in names)
    params = inject_trainable(model, rank=2, alpha=4, targets=names, seed=0)
    with torch.no_grad():  # non-zero B, so the adapters change the output
        for p in params[1::2]:
            p.normal_(0, 0.1)
    ex = _examples(model.config.vocab_size)
    full = make_batches(ex, batch_size=4, pad_id=0)[0]
    model(**full).loss.backward()
    g_full = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    cached = make_batches(ex, batch_size=4, pad_id=0, embeds=prefix.compute_states(model, k, ex))[0]
    cached.pop("input_ids")
    prefix.top_view(model, k)(**cached).loss.backward()
    for a, b in zip(g_full, (p.grad for p in params)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_gpt2_is_refused_and_would_be_wrong():
    """GPT-2 adds position embeddings to inputs_embeds: the table says no, and rightly."""
    model = _tiny("gpt2")
    assert not ARCHS["gpt2"].prefix_cache
    with pytest.raises(UsageError, match="does not allow"):
        prefix.split_point(model, 2)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        full = model(ids).logits
        h = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(4))  # h_0
        cut = model(inputs_embeds=h).logits  # positions added a second time
    assert not torch.allclose(full, cut, atol=1e-3)


def test_split_point_range_and_top_only_check():
    model = _tiny("llama")
    assert prefix.split_point(model, 1) == 3
    assert prefix.split_point(model, 4) == 0
    for bad in (0, 5):
        with pytest.raises(UsageError, match="between 1 and"):
            prefix.split_point(model, bad)
    with pytest.raises(UsageError, match="not in the top layers"):
        prefix.check_top_only(model, ["model.layers.1.mlp.up_proj"], 2, "adapter")
    prefix.check_top_only(model, ["model.layers.3.mlp.up_proj"], 2, "adapter")


def test_disk_cache_round_trip_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path))
    prefix.clear_memory()
    model = _tiny("llama")
    ex = _examples(model.config.vocab_size)
    first = prefix.prefix_states(model, 2, ex)
    files = list((tmp_path / "prefix").glob("*.safetensors"))
    assert len(files) == 1
    prefix.clear_memory()
    again = prefix.prefix_states(model, 2, ex)  # read back from disk
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    key = prefix.cache_key(model, 2, ex)
    assert key != prefix.cache_key(model, 1, ex)
    assert key != prefix.cache_key(model, 2, ex[:3])
    model.config._name_or_path = "/another/folder"  # a merged copy elsewhere shares the entry
    assert prefix.cache_key(model, 2, ex) == key
    with torch.no_grad():  # a change in the top layers keeps the key, one in the prefix changes it
        model.model.layers[3].mlp.up_proj.weight.add_(1.0)
        assert prefix.cache_key(model, 2, ex) == key
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)
        assert prefix.cache_key(model, 2, ex) != key
    files[0].write_bytes(b"damaged")  # a damaged entry is recomputed
    prefix.clear_memory()
    assert prefix._read(key) is None


def test_prefix_identity_is_remembered_until_a_prefix_weight_changes(monkeypatch):
    """The weights' bytes are hashed once per model (a study asks for the
    identity per evaluation and data set); any change the digest depends on
    (an in-place write, load_state_dict, a new parameter, a dtype) hashes
    them again and gives the same key a fresh hash would."""
    prefix.clear_memory()
    model = _tiny("llama")
    hashed = []
    real = prefix._hash_tensor
    monkeypatch.setattr(prefix, "_hash_tensor", lambda h, t: (hashed.append(1), real(h, t)))

    def fresh(m):  # the key without the memo
        prefix._DIGESTS.clear()
        return prefix.prefix_identity(m, 2)

    key = prefix.prefix_identity(model, 2)
    n = len(hashed)
    assert prefix.prefix_identity(model, 2) == key and len(hashed) == 2 * n  # outside the context: hashed
    monkeypatch.setattr(prefix, "_REMEMBER", [1])  # as inside remembering_digests(), undone after
    key = prefix.prefix_identity(model, 2)
    n = len(hashed)
    assert n > 0 and prefix.prefix_identity(model, 2) == key and len(hashed) == n  # remembered
    assert prefix.prefix_identity(model, 1) != key  # another split, its own digest
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.add_(1.0)  # the top layers are not in it
    n = len(hashed)
    assert prefix.prefix_identity(model, 2) == key and len(hashed) == n
    changes = [
        lambda m: m.model.layers[1].mlp.up_proj.weight.add_(1.0),
        lambda m: m.model.layers[0].self_attn.q_proj.weight[0, :3].mul_(2.0),  # through a view
        lambda m: m.load_state_dict(
            {**m.state_dict(), "model.embed_tokens.weight": m.model.embed_tokens.weight + 1}
        ),
        lambda m: setattr(
            m.model.layers[1].mlp.down_proj,
            "weight",
            torch.nn.Parameter(m.model.layers[1].mlp.down_proj.weight * 3),
        ),  # fmt: skip
        lambda m: m.to(torch.float64),
    ]
    for change in changes:
        before = prefix.prefix_identity(model, 2)
        with torch.no_grad():
            change(model)
        after = prefix.prefix_identity(model, 2)
        assert after != before and after == fresh(model)
    copy_ = __import__("copy").deepcopy(model)  # equal bytes in other tensors: hashed, same key
    n = len(hashed)
    assert prefix.prefix_identity(copy_, 2) == prefix.prefix_identity(model, 2) and len(hashed) > n
    prefix.clear_memory()


def test_cached_path_equals_the_full_forward_on_smollm2(smol):
    from loramix.data import encode_records, load_records
    from loramix.models import load_causal_lm

    from .factories import SHARED_DATA

    model, tok = load_causal_lm(smol)
    data = SHARED_DATA / "science.jsonl"
    if not data.exists():
        pytest.skip(f"no real data at {data}")
    ex = encode_records(tok, load_records(data, limit=3), max_len=48)
    la, lb, a, b = _full_and_cached(model, len(model.model.layers) - 4, ex)
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-4)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_top_targets_on_every_layer_keep_block_0():
    """--top-layers equal to the model's layers (k = 0): the targets of block 0
    are adapted too (``layer_of`` gives 0 there, which ``or -1`` took for
    'not in a block', so block 0 was silently left out)."""
    model = _tiny("llama")
    k = prefix.split_point(model, 4)
    names = prefix.top_targets(model, ["q_proj"], k)
    assert names == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    assert prefix.top_targets(model, ["q_proj"], 3) == ["model.layers.3.self_attn.q_proj"]


def test_top_targets_refuse_a_named_target_outside_the_top_layers():
    """--targets q_proj,lm_head --top-layers 1: lm_head (outside the blocks)
    was left out without a word, and the adapter written without it (found
    on SmolLM2); so was a lower block's module named in full. Each is refused
    naming it; a suffix with matches in the top layers keeps those."""
    model = _tiny("llama")
    for extra in ("lm_head", "model.layers.0.self_attn.v_proj"):
        with pytest.raises(UsageError, match=f"target '{extra}' selects no module in the top layers"):
            prefix.top_targets(model, ["q_proj", extra], 3)
    assert prefix.top_targets(model, ["q_proj", "v_proj"], 3) == [
        "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj"
    ]  # fmt: skip
    assert prefix.top_targets(model, None, 3)  # the architecture's defaults: restricted, not refused


def test_a_union_is_its_parts_cached_alone(tmp_path, monkeypatch):
    """``parts``: each run of the list is computed and cached on its own, so a
    union over parts already cached runs no prefix, and gives their states
    (the same bits with the cache or without); parts that do not cut the
    list are refused."""
    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path))
    prefix.clear_memory()
    model = _tiny("llama")
    a = _examples(model.config.vocab_size, lengths=(7, 3, 12, 5, 9), seed=1)
    b = _examples(model.config.vocab_size, lengths=(4, 15, 6), seed=2)
    own = prefix.prefix_states(model, 2, a, batch_size=2) + prefix.prefix_states(model, 2, b, batch_size=2)
    with _counting_block_0(model) as ran:
        union = prefix.prefix_states(model, 2, a + b, batch_size=2, parts=[5, 3])
    assert ran == [] and all(torch.equal(u, o) for u, o in zip(union, own, strict=True))
    fresh = prefix.prefix_states(model, 2, a + b, batch_size=2, parts=[5, 0, 3], cache=None)
    assert all(torch.equal(u, o) for u, o in zip(fresh, own, strict=True))
    for bad in ([5, 2], [9, -1]):
        with pytest.raises(ValueError, match="do not cut"):
            prefix.prefix_states(model, 2, a + b, parts=bad)
    prefix.clear_memory()


def test_the_batch_size_is_part_of_the_key(tmp_path, monkeypatch):
    """States batched by 2 and cached (in memory, or on disk only) are not
    served to a run batching by 3: it runs the prefix itself and gets the
    bits of its own computation. Whether those bits differ from the batch-2
    ones depends on the machine's kernels (equal on an Intel CPU with AMX,
    not on a Zen 4), so the test counts the prefix's batches rather than
    comparing the two."""
    model = _tiny("llama")
    ex = _examples(model.config.vocab_size, lengths=(7, 3, 12, 5, 9, 4, 15, 6), seed=3)
    _not_served(tmp_path, monkeypatch, model, ex, dict(batch_size=2), dict(batch_size=3))
    assert prefix.cache_key(model, 2, ex, batch_size=2) != prefix.cache_key(model, 2, ex, batch_size=3)
    prefix.clear_memory()


def test_the_position_cap_is_part_of_the_key(tmp_path, monkeypatch):
    """States batched under a cap on positions (``max_tokens``) are not served
    to a run without it, nor the other way round; without a cap the key is
    the one entries cached before the cap existed have."""
    model = _tiny("llama")
    ex = _examples(model.config.vocab_size, lengths=(7, 3, 12, 5, 9, 4, 15, 6), seed=3)
    capped, whole = dict(batch_size=4, max_tokens=24), dict(batch_size=4)
    _not_served(tmp_path / "a", monkeypatch, model, ex, whole, capped)
    _not_served(tmp_path / "b", monkeypatch, model, ex, capped, whole)
    assert prefix.cache_key(model, 2, ex, batch_size=4, max_tokens=None) == prefix.cache_key(
        model, 2, ex, batch_size=4
    )
    prefix.clear_memory()
