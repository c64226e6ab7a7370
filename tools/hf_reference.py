#!/usr/bin/env python3
"""Golden outputs of transformers' DeepseekV32ForCausalLM for the C++ tests (SPEC.md §3).

Needs torch (2.11) and transformers (5.17); runs on a GPU when there is one, else on the CPU.
Builds a tiny random model with the shape of model/config.cpp's "tiny" preset, saves it with
save_pretrained (safetensors, fused experts), reloads it from disk, and runs it on fixed tokens:

  f32_dense/   float32, index_topk >= sequence length: every causal key is selected (dense attention)
  f32_sparse/  float32, index_topk = --index-topk: the indexer's top-k mask is applied
  bf16_sparse/ bfloat16 weights and activations (from_pretrained keeps weights_proj and the routing
               bias in fp32, as transformers does), the same top-k

Each run folder holds logits.npy [B, T, V] f32, loss.npy [] f64 (mean next-token cross-entropy over
B*(T-1) positions), layer_{i}_out.npy [B, T, D] f32 (decoder layer i's output, before the final norm),
final_hidden.npy [B, T, D] f32 (after the final norm), and for every layer indexer_topk_layer{i}.npy
[B, T, k] i32: the selected key positions per query, sorted ascending, -1 for slots beyond the causal
prefix (transformers' raw top-k also returns masked future positions there; they never receive
attention). The top folder has model/ (config.json + model.safetensors), tokens.npy [B, T] i64 and
manifest.json (versions, settings, every file with shape and dtype, the losses).

Usage: python3 tools/hf_reference.py --out ref/ [--seed 0] [--batch 2] [--seq-len 16]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch


def tiny_config_kwargs(args):
    # model/config.cpp preset_config("tiny"); keep the two in step.
    return dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=40,
        moe_intermediate_size=12,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=12,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        v_head_dim=6,
        qk_nope_head_dim=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        index_topk=args.index_topk,
        index_head_dim=8,
        index_n_heads=2,
        tie_word_embeddings=False,
        initializer_range=args.init_std,
        pad_token_id=None,
        bos_token_id=0,
        eos_token_id=1,
    )


def randomize(model, seed, std):
    """Every tensor random and non-trivial, so that a swapped or transposed tensor shows in the output."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):  # RMSNorm and the indexer's LayerNorm weights
                p.copy_(1.0 + 0.1 * randn(p.shape))
            elif name.endswith(".bias"):
                p.copy_(0.1 * randn(p.shape))
            else:
                p.copy_(std * randn(p.shape))
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * randn(b.shape))


def set_topk(model, k):
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = k
    model.config.index_topk = k


def clean_topk(idx):
    """[B, T, k] raw top-k -> sorted ascending, -1 where the position is in the query's future."""
    idx = idx.astype(np.int64)
    B, T, k = idx.shape
    t = np.arange(T).reshape(1, T, 1)
    idx = np.where(idx <= t, idx, np.iinfo(np.int64).max)
    idx = np.sort(idx, axis=-1)
    idx = np.where(idx == np.iinfo(np.int64).max, -1, idx)
    return idx.astype(np.int32)


def run(model, tokens, folder, manifest, key):
    os.makedirs(folder, exist_ok=True)
    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def idx_hook(_m, _inp, out, i=i):
            captured[f"indexer_topk_layer{i}"] = out.detach().cpu().numpy()

        def layer_hook(_m, _inp, out, i=i):
            h = out[0] if isinstance(out, (tuple, list)) else out
            captured[f"layer_{i}_out"] = h.detach().float().cpu().numpy()

        hooks.append(layer.self_attn.indexer.register_forward_hook(idx_hook))
        hooks.append(layer.register_forward_hook(layer_hook))
    hooks.append(model.model.norm.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("final_hidden", out.detach().float().cpu().numpy())))
    with torch.no_grad():
        out = model(input_ids=tokens, labels=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    files = {}

    def save(name, arr):
        np.save(os.path.join(folder, name + ".npy"), arr)
        files[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}

    save("logits", out.logits.detach().float().cpu().numpy())
    loss = float(out.loss.detach().double().cpu())
    save("loss", np.array(loss, dtype=np.float64))
    for name, arr in sorted(captured.items()):
        if name.startswith("indexer_topk"):
            save(name, clean_topk(arr))
            save(name + "_raw", arr.astype(np.int32))
        else:
            save(name, arr.astype(np.float32))
    manifest["runs"][key] = {"folder": os.path.basename(folder), "loss": loss, "files": files}
    print(f"[hf_reference] {key}: loss {loss:.9g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--index-topk", type=int, default=4)
    ap.add_argument("--init-std", type=float, default=0.1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    import transformers
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    if not transformers.__version__.startswith("5.17"):
        print(f"[hf_reference] warning: written against transformers 5.17, found {transformers.__version__}",
              file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)

    os.makedirs(args.out, exist_ok=True)
    model_dir = os.path.join(args.out, "model")
    # The per-expert loop ("eager"): transformers' grouped_mm path needs 16-byte strides, which the
    # tiny shapes do not have, and the loop is the plainest reference.
    cfg = DeepseekV32Config(**tiny_config_kwargs(args), experts_implementation="eager")
    model = DeepseekV32ForCausalLM(cfg).to(torch.float32)
    randomize(model, args.seed, args.init_std)
    model.save_pretrained(model_dir, safe_serialization=True)

    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g, dtype=torch.int64)
    np.save(os.path.join(args.out, "tokens.npy"), tokens.numpy())
    tokens = tokens.to(args.device)

    manifest = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "seed": args.seed,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "index_topk": args.index_topk,
        "init_std": args.init_std,
        "model_dir": "model",
        "tokens": {"file": "tokens.npy", "shape": [args.batch, args.seq_len], "dtype": "int64"},
        "runs": {},
    }

    # Reload from disk so the golden values come from exactly the saved file.
    def load(dtype):
        m = DeepseekV32ForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager",
                                                   experts_implementation="eager")
        return m.to(args.device).eval()

    m32 = load(torch.float32)
    set_topk(m32, max(args.seq_len, args.index_topk))
    run(m32, tokens, os.path.join(args.out, "f32_dense"), manifest, "f32_dense")
    set_topk(m32, args.index_topk)
    run(m32, tokens, os.path.join(args.out, "f32_sparse"), manifest, "f32_sparse")
    del m32

    m16 = load(torch.bfloat16)
    set_topk(m16, args.index_topk)
    run(m16, tokens, os.path.join(args.out, "bf16_sparse"), manifest, "bf16_sparse")

    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"[hf_reference] wrote {args.out}")


if __name__ == "__main__":
    main()
