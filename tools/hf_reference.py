#!/usr/bin/env python3
"""Golden outputs of transformers' own DeepSeek classes for the C++ tests (SPEC.md §1b, §3).

Needs torch (2.11) and transformers (5.17); runs on a GPU when there is one, else on the CPU.
Each golden set is a tiny random model of one architecture, saved with save_pretrained (the
config.json then gets the keys a real release of that family carries), reloaded from disk and run
on fixed tokens:

  hf_tiny        DeepseekV32ForCausalLM, the "tiny" preset of model/config.cpp (2 layers)
  v2_lite        DeepseekV2ForCausalLM, q_lora_rank null, softmax routing, topk_method greedy,
                 norm_topk_prob false, routed_scaling_factor 1 (DeepSeek-V2-Lite-like)
  v2_group       DeepseekV2ForCausalLM with a query LoRA, softmax routing, group_limited_greedy
                 (group score = the group's max), routed_scaling_factor 16 (DeepSeek-V2-like)
  v3_mtp         DeepseekV3ForCausalLM, query LoRA, sigmoid + correction bias, n_group 4, YaRN,
                 one MTP layer (model.layers.3.*), plus release_fp8/: the same weights written as
                 a DeepSeek-V3 release (F8_E4M3 + weight_scale_inv 128x128, per-expert names,
                 three shards with model.safetensors.index.json)
  v3_noqlora     DeepseekV3ForCausalLM, q_lora_rank null, n_group 1 (Moonlight-16B-A3B-like)
  v32_yarn       DeepseekV32ForCausalLM with YaRN, odd head dims and one MTP layer with its own indexer

Every new set has 3 layers (the first dense), odd head dimensions (qk_nope_head_dim 7, v_head_dim 5,
3 heads; the V2 sets: qk_nope_head_dim 6, as transformers' DeepseekV2 needs an even query head) and
2 shared experts.

Layout of one set folder:
  model/         save_pretrained output (config.json with release keys added, model.safetensors;
                 the MTP layer's tensors are added to model.safetensors under model.layers.{L}.*)
  tokens.npy     [B, T] i64
  manifest.json  versions, class, settings, every run with its files (shape, dtype) and losses,
                 each layer's attention scaling, the rotary inv_freq and attention scaling
  <run>/         logits.npy [B, T, V] f32, loss.npy [] f64 (mean next-token cross-entropy over
                 B*(T-1) positions), layer_{i}_out.npy [B, T, D] f32 (decoder layer i's output),
                 final_hidden.npy [B, T, D] f32 (after the final norm), and where the run is sparse,
                 indexer_topk_layer{i}.npy [B, T, k] i32: the keys each query attends to, sorted
                 ascending, -1 for slots beyond the causal prefix (_raw: as the top-k returned them).
                 With an MTP layer: mtp_logits.npy [B, T-1, V] f32 (position i reads the final
                 hidden state of token i and the embedding of token i+1, predicts token i+2),
                 mtp_loss.npy [] f64 (mean over B*(T-2) positions), mtp_layer_out.npy [B, T-1, D],
                 and mtp_indexer_topk.npy where the run is sparse and the layer has an indexer.

Runs:
  f32_dense              float32, every causal key attended (V3.2: index_topk >= T)
  f32_sparse             float32, sparse: V3.2 on its indexer's top-k; V2/V3 on a fixed random
                         selection of k keys per query applied as the attention mask
  bf16_sparse            (V3.2) bfloat16 weights and activations, its indexer's selection
  f32_on_bf16_selection  (V3.2) float32 on bf16_sparse's selection (forced through the indexer)
  release_fp8_dense      (v3_mtp) float32 on the weights of release_fp8/ (FP8 dequantized, the rest
                         from bf16), dense

The MTP reference (transformers has no MTP module) follows the DeepSeek-V3 report and the release
tensor names as vLLM/SGLang read them: h' = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]) with h_i
the main model's final normed hidden state, then a decoder layer of the same class at index L =
num_hidden_layers, then shared_head.norm and shared_head.head.

Export check (dsa-convert export -> transformers): scripts/golden_exports.sh writes each set's model as
this project exports it, to <set>/export/f32 and <set>/export/bf16. --check-exports GOLDEN_DIR loads
every such export with the transformers class its config.json names (weights upcast to float32),
runs the set's tokens densely and writes OUT/<set>/export/<dtype>/transformers/{logits,loss}.npy and
report.json (class, missing and unexpected keys). tests/model/test_hf_golden.cpp compares them with
this project's logits (bf16: on the bf16-rounded weights).

Usage:
  python3 tools/hf_reference.py --all --out DIR            # every set into DIR/<set>/
  python3 tools/hf_reference.py --set v2_lite --out DIR    # one set (repeatable)
  python3 tools/hf_reference.py --out DIR                  # hf_tiny alone into DIR (as before)
  python3 tools/hf_reference.py --check-exports tests/golden --out DIR
"""
import argparse
import copy
import json
import os
import sys
import traceback

import numpy as np
import torch

SETS = ["hf_tiny", "v2_lite", "v2_group", "v3_mtp", "v3_noqlora", "v32_yarn"]


def log(msg):
    print(f"[hf_reference] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ configs

def tiny_kwargs(index_topk, init_std):
    # model/config.cpp preset_config("tiny"); keep the two in step.
    return dict(
        vocab_size=256, hidden_size=32, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=12, q_lora_rank=16, qk_rope_head_dim=4,
        v_head_dim=6, qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        index_topk=index_topk, index_head_dim=8, index_n_heads=2, tie_word_embeddings=False,
        initializer_range=init_std, pad_token_id=None, bos_token_id=0, eos_token_id=1)


def common_new(init_std):
    """Shared by the new sets: 3 layers (first dense), odd head dims, 2 shared experts."""
    return dict(
        vocab_size=200, hidden_size=36, intermediate_size=44, moe_intermediate_size=10, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=3, num_key_value_heads=3, n_shared_experts=2,
        n_routed_experts=8, kv_lora_rank=10, qk_rope_head_dim=4, v_head_dim=5, qk_nope_head_dim=7,
        num_experts_per_tok=3, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, initializer_range=init_std, pad_token_id=None, bos_token_id=0,
        eos_token_id=1)


# YaRN with max_position_embeddings = factor * original_max_position_embeddings, so that every reading
# of the factor (the key, or the ratio of the two lengths) agrees; mscale != mscale_all_dim exercises
# both the cos/sin attention factor and the softmax-scale correction.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}


def set_spec(name, args):
    """(architecture, config kwargs, release keys added to config.json, settings)."""
    std = args.init_std
    if name == "hf_tiny":
        return "v32", tiny_kwargs(args.index_topk, std), {}, dict(mtp=False, sparse_k=args.index_topk)
    kw = common_new(std)
    if name.startswith("v2"):
        # transformers' DeepseekV2 rotates q_pe/k_pe through torch.view_as_complex on a slice of q,
        # which needs an even stride: qk_nope_head_dim + qk_rope_head_dim must be even (V2: 128 + 64).
        kw.update(qk_nope_head_dim=6)
    if name == "v2_lite":
        kw.update(q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False,
                  routed_scaling_factor=1.0)
        rel = dict(scoring_func="softmax", topk_method="greedy", aux_loss_alpha=0.001, seq_aux=True,
                   moe_layer_freq=1, ep_size=1)
        return "v2", kw, rel, dict(mtp=False, sparse_k=5)
    if name == "v2_group":
        kw.update(q_lora_rank=14, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                  norm_topk_prob=False, routed_scaling_factor=16.0)
        rel = dict(scoring_func="softmax", topk_method="group_limited_greedy", aux_loss_alpha=0.003,
                   seq_aux=True, moe_layer_freq=1, ep_size=1)
        return "v2", kw, rel, dict(mtp=False, sparse_k=5)
    if name == "v3_mtp":
        kw.update(q_lora_rank=14, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                  rope_parameters=dict(YARN), max_position_embeddings=64, rope_interleave=True)
        rel = dict(scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001, seq_aux=True,
                   moe_layer_freq=1, ep_size=1, num_nextn_predict_layers=1)
        return "v3", kw, rel, dict(mtp=True, sparse_k=5, fp8_release=True)
    if name == "v3_noqlora":
        kw.update(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.446,
                  rope_interleave=True)
        rel = dict(scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001, seq_aux=True,
                   moe_layer_freq=1, ep_size=1, num_nextn_predict_layers=0)
        return "v3", kw, rel, dict(mtp=False, sparse_k=5)
    if name == "v32_yarn":
        kw.update(q_lora_rank=14, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                  rope_parameters=dict(YARN), max_position_embeddings=64, index_topk=5, index_head_dim=8,
                  index_n_heads=3)
        rel = dict(scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001, seq_aux=True,
                   moe_layer_freq=1, ep_size=1, num_nextn_predict_layers=1)
        return "v32", kw, rel, dict(mtp=True, sparse_k=5)
    raise SystemExit(f"unknown set {name}; known: {', '.join(SETS)}")


def classes(arch):
    import transformers as tf
    return {"v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM),
            "v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
            "v32": (tf.DeepseekV32Config, tf.DeepseekV32ForCausalLM)}[arch]


# --------------------------------------------------------------------------------------- weights

def randomize_named(named, gen, std):
    """Every tensor random and non-trivial, so that a swapped or transposed tensor shows in the output."""
    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    with torch.no_grad():
        for name, p in named:
            if name.endswith("norm.weight"):  # RMSNorm and the indexer's LayerNorm weights
                p.copy_(1.0 + 0.1 * randn(p.shape))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * randn(p.shape))
            elif name.endswith(".bias"):
                p.copy_(0.1 * randn(p.shape))
            else:
                p.copy_(std * randn(p.shape))


def randomize(model, seed, std):
    g = torch.Generator().manual_seed(seed)
    randomize_named(sorted(model.named_parameters()), g, std)
    buffers = [(n, b) for n, b in sorted(model.named_buffers()) if n.endswith("e_score_correction_bias")]
    randomize_named(buffers, g, std)


def mtp_config(cfg):
    """A copy of the model config under which a decoder layer at index L = num_hidden_layers exists."""
    c = copy.deepcopy(cfg)
    L = cfg.num_hidden_layers
    c.num_hidden_layers = L + 1
    for key in ("mlp_layer_types", "layer_types"):
        v = getattr(c, key, None)
        if isinstance(v, list) and len(v) == L:
            setattr(c, key, v + [v[-1]])
    return c


class MtpModules(torch.nn.Module):
    """The MTP layer's own tensors, named as in the release files below model.layers.{L}."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        D, V = cfg.hidden_size, cfg.vocab_size
        norm_cls = type(model.model.norm)
        self.enorm = norm_cls(D, eps=cfg.rms_norm_eps)
        self.hnorm = norm_cls(D, eps=cfg.rms_norm_eps)
        self.eh_proj = torch.nn.Linear(2 * D, D, bias=False)
        self.shared_head = torch.nn.Module()
        self.shared_head.norm = norm_cls(D, eps=cfg.rms_norm_eps)
        self.shared_head.head = torch.nn.Linear(D, V, bias=False)
        self.embed_tokens = torch.nn.Embedding(V, D)
        layer_cls = type(model.model.layers[0])
        self.block = layer_cls(mtp_config(cfg), cfg.num_hidden_layers)

    def release_state(self, L):
        """name -> tensor with release names (the block's tensors directly under model.layers.{L}.)."""
        out = {}
        for k, v in self.state_dict().items():
            name = k[len("block."):] if k.startswith("block.") else k
            out[f"model.layers.{L}.{name}"] = v.detach().clone()
        return out

    def load_release_state(self, tensors, L):
        pre = f"model.layers.{L}."
        sd = {}
        for k in self.state_dict().keys():
            name = k[len("block."):] if k.startswith("block.") else k
            sd[k] = tensors[pre + name]
        self.load_state_dict(sd, strict=True)


# ------------------------------------------------------------------------------------------ runs

def clean_topk(idx):
    """[B, T, k] raw top-k -> sorted ascending, -1 where the position is in the query's future."""
    idx = idx.astype(np.int64)
    B, T, k = idx.shape
    t = np.arange(T).reshape(1, T, 1)
    idx = np.where(idx <= t, idx, np.iinfo(np.int64).max)
    idx = np.sort(idx, axis=-1)
    idx = np.where(idx == np.iinfo(np.int64).max, -1, idx)
    return idx.astype(np.int32)


def random_selection(B, T, k, seed):
    """Raw [B, T, k] selection: all of s <= t (padded with future keys, which the causal mask hides)
    while t + 1 <= k, else k distinct random keys of [0, t]."""
    rng = np.random.default_rng(seed)
    out = np.zeros((B, T, k), dtype=np.int32)
    for b in range(B):
        for t in range(T):
            if t + 1 <= k:
                out[b, t] = np.arange(k)
            else:
                out[b, t] = np.sort(rng.choice(t + 1, size=k, replace=False))
    return out


def selection_mask(raw, T, dtype, device):
    """Additive [B, 1, T, T] mask: 0 on selected keys s <= t, the dtype's minimum elsewhere."""
    B = raw.shape[0]
    allowed = torch.zeros((B, T, T), dtype=torch.bool)
    idx = torch.from_numpy(raw.astype(np.int64))
    allowed.scatter_(-1, idx, True)
    allowed &= torch.tril(torch.ones((T, T), dtype=torch.bool))
    mask = torch.zeros((B, 1, T, T), dtype=dtype)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    return mask.to(device)


def force_attention_mask(layer, mask):
    """Pre-hook replacing the attention mask the decoder layer hands to self_attn."""
    def hook(_m, args, kwargs):
        if "attention_mask" not in kwargs:
            raise RuntimeError("self_attn was not called with attention_mask=...: cannot force a selection")
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask
        return args, kwargs
    return layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)


def indexer_hooks(attn, name, captured, forced):
    """Capture the indexer's raw top-k as `name`; with `forced` (raw [B, T, k]) return that instead."""
    def hook(_m, _inp, out):
        if forced is not None:
            out = torch.from_numpy(forced).to(device=out.device, dtype=out.dtype)
        captured[name] = out.detach().cpu().numpy()
        return out
    return attn.indexer.register_forward_hook(hook)


def save_arr(folder, files, name, arr):
    np.save(os.path.join(folder, name + ".npy"), arr)
    files[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}


def run(model, tokens, folder, manifest, key, mtp=None, forced=None, forced_mtp=None, mask_sel=None,
        mtp_mask_sel=None):
    """One forward of the main model (+ the MTP layer) with capture hooks.

    forced: per layer raw [B, T, k] selections forced through the V3.2 indexer (None: its own);
    mask_sel: per layer raw selections applied as the attention mask (V2/V3 sparse runs)."""
    os.makedirs(folder, exist_ok=True)
    captured, hooks, layer_kwargs = {}, [], {}
    B, T = tokens.shape
    has_indexer = hasattr(model.model.layers[0].self_attn, "indexer")
    for i, layer in enumerate(model.model.layers):
        def layer_hook(_m, _inp, out, i=i):
            h = out[0] if isinstance(out, (tuple, list)) else out
            captured[f"layer_{i}_out"] = h.detach().float().cpu().numpy()
        hooks.append(layer.register_forward_hook(layer_hook))
        if has_indexer:
            hooks.append(indexer_hooks(layer.self_attn, f"indexer_topk_layer{i}", captured,
                                       None if forced is None else forced[i]))
        if mask_sel is not None:
            hooks.append(force_attention_mask(layer, selection_mask(mask_sel[i], T, model.dtype, tokens.device)))

    def pre0(_m, args, kwargs):  # the decoder layers' shared inputs, for the MTP layer
        layer_kwargs.update(kwargs)
    hooks.append(model.model.layers[0].register_forward_pre_hook(pre0, with_kwargs=True))
    hooks.append(model.model.norm.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("final_hidden_t", out.detach())))
    with torch.no_grad():
        out = model(input_ids=tokens, labels=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    files = {}
    save_arr(folder, files, "logits", out.logits.detach().float().cpu().numpy())
    loss = float(out.loss.detach().double().cpu())
    save_arr(folder, files, "loss", np.array(loss, dtype=np.float64))
    final = captured.pop("final_hidden_t")
    save_arr(folder, files, "final_hidden", final.float().cpu().numpy())
    for name, arr in sorted(captured.items()):
        if name.startswith("indexer_topk"):
            save_arr(folder, files, name, clean_topk(arr))
            save_arr(folder, files, name + "_raw", arr.astype(np.int32))
        else:
            save_arr(folder, files, name, arr.astype(np.float32))
    if mask_sel is not None:  # the selection the V2/V3 sparse run applied, in the indexer files' format
        for i, sel in enumerate(mask_sel):
            save_arr(folder, files, f"indexer_topk_layer{i}", clean_topk(sel))
            save_arr(folder, files, f"indexer_topk_layer{i}_raw", sel.astype(np.int32))
    entry = {"folder": os.path.basename(folder), "loss": loss, "files": files}
    if mtp is not None:
        entry["mtp_loss"] = run_mtp(model, mtp, tokens, final, layer_kwargs, folder, files, forced_mtp,
                                    mtp_mask_sel)
    manifest["runs"][key] = entry
    extra = f", MTP loss {entry['mtp_loss']:.9g}" if "mtp_loss" in entry else ""
    log(f"  {key}: loss {loss:.9g}{extra}")
    return entry


def run_mtp(model, mtp, tokens, final, layer_kwargs, folder, files, forced_mtp, mtp_mask_sel):
    """MTP depth 1 over positions 0..T-1: position i reads h_i (main final normed hidden state) and
    embed(t_{i+1}); the last position reads token 0 in place of the missing t_T, which changes no
    earlier position (causal attention, per-token routing) and is not saved."""
    B, T = tokens.shape
    nxt = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    captured = {}
    hooks = []
    if hasattr(mtp.block.self_attn, "indexer"):
        hooks.append(indexer_hooks(mtp.block.self_attn, "mtp_indexer_topk", captured, forced_mtp))
    if mtp_mask_sel is not None:
        hooks.append(force_attention_mask(mtp.block, selection_mask(mtp_mask_sel, T, model.dtype, tokens.device)))
    kwargs = {k: v for k, v in layer_kwargs.items() if k != "hidden_states"}
    with torch.no_grad():
        e = mtp.enorm(mtp.embed_tokens(nxt).to(final.dtype))
        h = mtp.hnorm(final)
        x = mtp.eh_proj(torch.cat([e, h], dim=-1))
        y = mtp.block(x, **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y
        logits = mtp.shared_head.head(mtp.shared_head.norm(y)).float()
        loss = torch.nn.functional.cross_entropy(logits[:, : T - 2].reshape(-1, logits.shape[-1]),
                                                 tokens[:, 2:].reshape(-1)).double()
    for hk in hooks:
        hk.remove()
    save_arr(folder, files, "mtp_logits", logits[:, : T - 1].cpu().numpy().astype(np.float32))
    save_arr(folder, files, "mtp_layer_out", y[:, : T - 1].detach().float().cpu().numpy())
    mtp_loss = float(loss.cpu())
    save_arr(folder, files, "mtp_loss", np.array(mtp_loss, dtype=np.float64))
    if "mtp_indexer_topk" in captured:
        raw = captured["mtp_indexer_topk"]
        save_arr(folder, files, "mtp_indexer_topk", clean_topk(raw))
        save_arr(folder, files, "mtp_indexer_topk_raw", raw.astype(np.int32))
    if mtp_mask_sel is not None:
        save_arr(folder, files, "mtp_indexer_topk", clean_topk(mtp_mask_sel))
        save_arr(folder, files, "mtp_indexer_topk_raw", mtp_mask_sel.astype(np.int32))
    return mtp_loss


def set_topk(model, mtp, k):
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = k
    if mtp is not None and hasattr(mtp.block.self_attn, "indexer"):
        mtp.block.self_attn.indexer.index_topk = k
    model.config.index_topk = k


def patch_v2_moe(model):
    """transformers' DeepseekV2Moe.route_tokens_to_experts reads self.num_experts, which some versions
    never set; give it the config's n_routed_experts (the function is unchanged)."""
    n = 0
    for m in model.modules():
        if hasattr(m, "topk_method") and hasattr(m, "experts") and not hasattr(m, "num_experts"):
            m.num_experts = model.config.n_routed_experts
            n += 1
    if n:
        log(f"  note: set num_experts on {n} DeepseekV2Moe modules (missing attribute in this transformers)")


# ---------------------------------------------------------------------------------- safetensors

def st_load(path):
    from safetensors.torch import load_file
    return load_file(path)


def st_save(tensors, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def model_tensors(model_dir):
    """Every tensor of a save_pretrained directory (one file or shards)."""
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fn in files:
        out.update(st_load(os.path.join(model_dir, fn)))
    return out, files


def quant_fp8(w, block=128):
    """w [R, C] f32 -> (F8_E4M3 codes, f32 scale_inv [ceil(R/128), ceil(C/128)]), scale = amax / 448."""
    R, C = w.shape
    br, bc = (R + block - 1) // block, (C + block - 1) // block
    scale = torch.zeros((br, bc), dtype=torch.float32)
    scaled = torch.zeros((R, C), dtype=torch.float32)
    for i in range(br):
        for j in range(bc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = float(blk.abs().max()) / 448.0
            s = s if s > 0 else 1.0
            scale[i, j] = s
            scaled[i * block:(i + 1) * block, j * block:(j + 1) * block] = blk / s
    return scaled.to(torch.float8_e4m3fn), scale


def dequant_fp8(q, scale, block=128):
    R, C = q.shape
    s = scale.repeat_interleave(block, 0)[:R].repeat_interleave(block, 1)[:, :C]
    return q.float() * s


def is_quantized_in_release(name, t):
    """The tensors a DeepSeek-V3 release stores in FP8: the linear weights of the decoder layers
    (attention, dense MLP, experts, shared experts); not embeddings, head, norms, router, MTP glue."""
    if t.dim() != 2 or not name.startswith("model.layers.") or not name.endswith(".weight"):
        return False
    skip = ("norm", "mlp.gate.weight", "eh_proj", "shared_head", "embed_tokens", "weights_proj")
    return not any(s in name for s in skip)


def write_fp8_release(model_dir, out_dir, cfg_json, n_shards=3):
    """The weights of model_dir as a DeepSeek-V3 release: per-expert names, FP8 + scale_inv, bf16 for
    the rest (f32 routing bias), sharded with an index. Returns the dequantized f32 tensors (fused
    experts, the names of model_dir) that the release holds."""
    src, _ = model_tensors(model_dir)
    rel = {}
    for name, t in src.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            base = name[: name.rfind("experts.") + len("experts.")]
            E = t.shape[0]
            for e in range(E):
                if name.endswith("gate_up_proj"):
                    I = t.shape[1] // 2
                    rel[f"{base}{e}.gate_proj.weight"] = t[e, :I].clone()
                    rel[f"{base}{e}.up_proj.weight"] = t[e, I:].clone()
                else:
                    rel[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            rel[name] = t
    stored, deq = {}, {}
    for name, t in sorted(rel.items()):
        if is_quantized_in_release(name, t):
            q, s = quant_fp8(t.float())
            stored[name] = q
            stored[name + "_scale_inv"] = s
            deq[name] = dequant_fp8(q, s)
        elif name.endswith("e_score_correction_bias"):
            stored[name] = t.float()
            deq[name] = t.float()
        else:
            stored[name] = t.to(torch.bfloat16)
            deq[name] = stored[name].float()
    # Re-fuse the experts for loading into transformers' fused modules.
    fused = {}
    for name in list(deq.keys()):
        if ".mlp.experts." in name and name.endswith(".gate_proj.weight"):
            base = name[: name.rfind("experts.") + len("experts.")]
            if base + "gate_up_proj" in fused:
                continue
            E = 0
            while f"{base}{E}.gate_proj.weight" in deq:
                E += 1
            fused[base + "gate_up_proj"] = torch.stack(
                [torch.cat([deq[f"{base}{e}.gate_proj.weight"], deq[f"{base}{e}.up_proj.weight"]], 0)
                 for e in range(E)])
            fused[base + "down_proj"] = torch.stack([deq[f"{base}{e}.down_proj.weight"] for e in range(E)])
    for name, t in deq.items():
        if ".mlp.experts." not in name:
            fused[name] = t
    # Shards of about equal size, layer order, with the index a release has.
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(stored.keys())
    total = sum(stored[n].numel() * stored[n].element_size() for n in names)
    per, shards, cur, cur_bytes = total / n_shards, [], [], 0
    for n in names:
        cur.append(n)
        cur_bytes += stored[n].numel() * stored[n].element_size()
        if cur_bytes >= per and len(shards) < n_shards - 1:
            shards.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        shards.append(cur)
    weight_map = {}
    for k, group in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        st_save({n: stored[n] for n in group}, os.path.join(out_dir, fn))
        for n in group:
            weight_map[n] = fn
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    rc = dict(cfg_json)
    rc["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [128, 128]}
    rc["torch_dtype"] = "bfloat16"
    rc.pop("dtype", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(rc, f, indent=2)
    log(f"  release_fp8: {len(stored)} tensors in {len(shards)} shards, "
        f"{sum(1 for n in stored if n.endswith('_scale_inv'))} FP8 with scale_inv")
    return fused


# ------------------------------------------------------------------------------------------ sets

def load_model(cls, model_dir, config, dtype, device):
    """from_pretrained of model_dir (config.json with the release keys). Should this transformers
    refuse a release key, the load is retried with the in-memory config object (same weights), so
    the goldens still come; the failure is printed."""
    kw = dict(dtype=dtype, attn_implementation="eager", experts_implementation="eager")
    try:
        m = cls.from_pretrained(model_dir, **kw)
    except Exception as e:  # noqa: BLE001 - reported, then the fallback
        log(f"  note: from_pretrained({model_dir}) with its config.json failed ({type(e).__name__}: {e}); "
            "retrying with the config object")
        m = cls.from_pretrained(model_dir, config=copy.deepcopy(config), **kw)
    return m.to(device).eval()


def generate_set(name, out, args, device):
    import transformers
    arch, kw, release_keys, st = set_spec(name, args)
    cfg_cls, model_cls = classes(arch)
    log(f"set {name}: {model_cls.__name__} -> {out}")
    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "model")
    seed = args.seed
    torch.manual_seed(seed)
    cfg = cfg_cls(**kw, experts_implementation="eager")
    model = model_cls(cfg).to(torch.float32)
    randomize(model, seed, args.init_std)
    model.save_pretrained(model_dir, safe_serialization=True)
    L = cfg.num_hidden_layers

    # The MTP layer's tensors join model.safetensors (transformers does not know them).
    mtp_state = None
    if st.get("mtp"):
        mtp = MtpModules(model).to(torch.float32)
        g = torch.Generator().manual_seed(seed + 100)
        randomize_named(sorted(mtp.named_parameters()), g, args.init_std)
        randomize_named([(n, b) for n, b in sorted(mtp.named_buffers()) if n.endswith("e_score_correction_bias")],
                        g, args.init_std)
        with torch.no_grad():  # shared with the main model, as the report has it; the files hold copies
            mtp.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
            mtp.shared_head.head.weight.copy_(model.lm_head.weight)
        mtp_state = mtp.release_state(L)
        tensors, files = model_tensors(model_dir)
        if files != ["model.safetensors"]:
            raise RuntimeError(f"expected one model.safetensors in {model_dir}, got {files}")
        tensors.update(mtp_state)
        st_save(tensors, os.path.join(model_dir, "model.safetensors"))
        log(f"  added {len(mtp_state)} MTP tensors (model.layers.{L}.*)")

    # config.json as a release of the family has it.
    cfg_path = os.path.join(model_dir, "config.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    cfg_json.update(release_keys)
    with open(cfg_path, "w") as f:
        json.dump(cfg_json, f, indent=2, sort_keys=True)

    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g, dtype=torch.int64)
    np.save(os.path.join(out, "tokens.npy"), tokens.numpy())
    tokens = tokens.to(device)
    B, T = tokens.shape

    manifest = {
        "set": name, "class": model_cls.__name__, "torch": torch.__version__,
        "transformers": transformers.__version__, "device": device, "seed": seed, "batch": B, "seq_len": T,
        "init_std": args.init_std, "model_dir": "model", "release_keys": release_keys,
        "tokens": {"file": "tokens.npy", "shape": [B, T], "dtype": "int64"}, "runs": {},
    }
    if arch == "v32":
        manifest["index_topk"] = st["sparse_k"]
    if st.get("mtp"):
        manifest["mtp_layer"] = L

    def loaded(dtype):
        # from_pretrained ignores the MTP tensors (unexpected keys): build the MTP modules from the file.
        m = load_model(model_cls, model_dir, cfg, dtype, device)
        if arch == "v2":
            patch_v2_moe(m)
        mt = None
        if st.get("mtp"):
            mt = MtpModules(m)
            mt.load_release_state(st_load(os.path.join(model_dir, "model.safetensors")), L)
            mt = mt.to(device=device, dtype=dtype).eval()
            if arch == "v2":
                patch_v2_moe(mt)
        return m, mt

    m32, mtp32 = loaded(torch.float32)
    manifest["attention_scaling"] = [float(l.self_attn.scaling) for l in m32.model.layers]
    rot = m32.model.rotary_emb
    manifest["rotary"] = {"inv_freq": [float(v) for v in rot.inv_freq.detach().cpu().tolist()],
                          "attention_scaling": float(getattr(rot, "attention_scaling", 1.0))}
    manifest["config"] = json.loads(m32.config.to_json_string())
    k = st["sparse_k"]
    if arch == "v32":
        set_topk(m32, mtp32, max(T, k))
        run(m32, tokens, os.path.join(out, "f32_dense"), manifest, "f32_dense", mtp=mtp32)
        set_topk(m32, mtp32, k)
        run(m32, tokens, os.path.join(out, "f32_sparse"), manifest, "f32_sparse", mtp=mtp32)
    else:
        run(m32, tokens, os.path.join(out, "f32_dense"), manifest, "f32_dense", mtp=mtp32)
        sel = [random_selection(B, T, k, seed + 10 + i) for i in range(L)]
        run(m32, tokens, os.path.join(out, "f32_sparse"), manifest, "f32_sparse", mtp=mtp32, mask_sel=sel,
            mtp_mask_sel=random_selection(B, T, k, seed + 10 + L) if mtp32 is not None else None)
        manifest["runs"]["f32_sparse"]["selection"] = "random (fixed seed), applied as the attention mask"

    if arch == "v32":
        m16, mtp16 = loaded(torch.bfloat16)
        set_topk(m16, None, k)
        e16 = run(m16, tokens, os.path.join(out, "bf16_sparse"), manifest, "bf16_sparse")
        del m16, mtp16
        raw16 = [np.load(os.path.join(out, "bf16_sparse", f"indexer_topk_layer{i}_raw.npy")) for i in range(L)]
        run(m32, tokens, os.path.join(out, "f32_on_bf16_selection"), manifest, "f32_on_bf16_selection",
            forced=raw16)
        manifest["runs"]["f32_on_bf16_selection"]["selection"] = "bf16_sparse's indexer top-k, forced"
        assert e16["loss"] == e16["loss"], "bf16 loss is NaN"

    if st.get("fp8_release"):
        rel_dir = os.path.join(out, "release_fp8")
        deq = write_fp8_release(model_dir, rel_dir, cfg_json)
        main_sd = {n: t for n, t in deq.items() if not n.startswith(f"model.layers.{L}.")}
        mr = load_model(model_cls, model_dir, cfg, torch.float32, device)
        missing, unexpected = mr.load_state_dict({n: t.to(device) for n, t in main_sd.items()}, strict=False)
        missing = [n for n in missing if "rotary" not in n]
        if missing or unexpected:
            raise RuntimeError(f"release weights do not fit the model: missing {missing}, unexpected {unexpected}")
        mtr = None
        if st.get("mtp"):
            mtr = MtpModules(mr)
            mtr.load_release_state(deq, L)
            mtr = mtr.to(device).eval()
        run(mr, tokens, os.path.join(out, "release_fp8_dense"), manifest, "release_fp8_dense", mtp=mtr)
        manifest["runs"]["release_fp8_dense"]["weights"] = "release_fp8/ (dequantized)"
        manifest["release_fp8"] = {"dir": "release_fp8"}

    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    log(f"  wrote {out}")


def check_exports(golden_dir, out_dir, device):
    """Loads every <set>/export/<dtype> of golden_dir with transformers; returns the failed exports."""
    import transformers
    failed = []
    for name in sorted(os.listdir(golden_dir)):
        set_dir = os.path.join(golden_dir, name)
        for dt in ("f32", "bf16"):
            exp = os.path.join(set_dir, "export", dt)
            if not os.path.exists(os.path.join(exp, "config.json")):
                continue
            try:
                with open(os.path.join(exp, "config.json")) as f:
                    arch = json.load(f)["architectures"][0]
                cls = getattr(transformers, arch)
                log(f"export {name}/{dt}: {arch}")
                model, info = cls.from_pretrained(exp, dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager", output_loading_info=True)
                model = model.to(device).eval()
                if arch == "DeepseekV2ForCausalLM":
                    patch_v2_moe(model)
                tokens = torch.from_numpy(np.load(os.path.join(set_dir, "tokens.npy"))).to(device)
                T = tokens.shape[1]
                if hasattr(model.model.layers[0].self_attn, "indexer"):
                    set_topk(model, None, T)  # dense: every causal key
                with torch.no_grad():
                    out = model(input_ids=tokens, labels=tokens, use_cache=False)
                folder = os.path.join(out_dir, name, "export", dt, "transformers")
                os.makedirs(folder, exist_ok=True)
                np.save(os.path.join(folder, "logits.npy"), out.logits.detach().float().cpu().numpy())
                loss = float(out.loss.detach().double().cpu())
                np.save(os.path.join(folder, "loss.npy"), np.array(loss, dtype=np.float64))
                report = {"class": arch, "loss": loss, "transformers": transformers.__version__,
                          "missing_keys": sorted(info.get("missing_keys", [])),
                          "unexpected_keys": sorted(info.get("unexpected_keys", []))}
                with open(os.path.join(folder, "report.json"), "w") as f:
                    json.dump(report, f, indent=2)
                log(f"  loss {loss:.9g}, {len(report['missing_keys'])} missing keys "
                    f"{report['missing_keys'][:4]}, {len(report['unexpected_keys'])} unexpected")
            except Exception:  # keep going: report every export
                traceback.print_exc()
                failed.append(f"{name}/{dt}")
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--all", action="store_true", help="every set, each into OUT/<set>/")
    ap.add_argument("--set", action="append", default=[], help=f"one of {', '.join(SETS)} (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--index-topk", type=int, default=4, help="hf_tiny's top-k")
    ap.add_argument("--init-std", type=float, default=0.1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--allow-other-versions", action="store_true")
    ap.add_argument("--check-exports", metavar="GOLDEN_DIR",
                    help="load GOLDEN_DIR/<set>/export/{f32,bf16} with transformers (see above)")
    args = ap.parse_args()

    import transformers
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}")
    if not (transformers.__version__.startswith("5.17") and torch.__version__.startswith("2.11")):
        msg = f"written against torch 2.11 + transformers 5.17, found {torch.__version__} + {transformers.__version__}"
        if not args.allow_other_versions:
            raise SystemExit(f"[hf_reference] {msg} (--allow-other-versions to run anyway)")
        log(f"warning: {msg}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    if args.check_exports:
        failed = check_exports(args.check_exports, args.out, args.device)
        if failed:
            log(f"failed exports: {', '.join(failed)}")
            sys.exit(1)
        log(f"export check written under {args.out}")
        return
    if not args.all and not args.set:  # the original interface: hf_tiny directly into --out
        generate_set("hf_tiny", args.out, args, args.device)
        return
    names = SETS if args.all else args.set
    failed = []
    for name in names:
        try:
            generate_set(name, os.path.join(args.out, name), args, args.device)
        except Exception:  # keep going: one GPU session should yield every set that works
            traceback.print_exc()
            failed.append(name)
            log(f"set {name} FAILED (traceback above)")
    if failed:
        log(f"failed sets: {', '.join(failed)}")
        sys.exit(1)
    log(f"all {len(names)} sets written under {args.out}")


if __name__ == "__main__":
    main()
