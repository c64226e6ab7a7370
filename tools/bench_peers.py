#!/usr/bin/env python3
"""PyTorch peers of dsa-bench, run on the same GPU in the same job (SPEC.md §4).

  train:   transformers 5.17 DeepseekV3ForCausalLM (dense attention) and DeepseekV32ForCausalLM
           (indexer scores + a top-k mask on dense attention: "masked dense") on the bench-small config,
           bf16, fused AdamW, 16K tokens per step (batch 16K/L below 16K): tokens/s and peak memory.
  warmup:  the indexer warm-up step in PyTorch, the same work as dsa-bench's warmup stage: the frozen
           DeepseekV3 model's forward (no LM backward), per layer the head-summed dense attention target
           (L1-normalized over s <= t, streamed by query blocks, never [H, L, L]), the indexer's scores
           (ReLU, head weights), KL(p || softmax(I)), and the indexer's backward and AdamW step.
  kernels: SDPA flash attention (MHA 192/128, 128 heads), torch.topk k=2048 per row, and sparse MLA
           attention by gather (MQA 576/512, 128 heads, k=2048), fwd and fwd+bwd.

Every figure: CUDA events, warm-up, the median of the repetitions; JSON lines appended to --json.
Usage: python3 tools/bench_peers.py [--json FILE] [--seq-lens 4096,16384] [--skip-train] [--skip-kernels]
       [--skip-warmup]
"""
import argparse
import json
import math
import statistics
import sys

import torch

BENCH_SMALL = dict(vocab_size=129280, hidden_size=1024, num_hidden_layers=8, first_k_dense_replace=1,
                   num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256,
                   qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=2816,
                   moe_intermediate_size=512, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                   topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, tie_word_embeddings=False,
                   index_n_heads=16, index_head_dim=64, index_topk=512, max_position_embeddings=131072)


def median_ms(fn, warm=2, reps=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def emit(out, rec):
    print(json.dumps(rec), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def train_peers(args):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM
    for name, cfg_cls, model_cls in (("DeepseekV3", DeepseekV3Config, DeepseekV3ForCausalLM),
                                     ("DeepseekV32 (masked dense)", DeepseekV32Config, DeepseekV32ForCausalLM)):
        kw = dict(BENCH_SMALL)
        if name == "DeepseekV3":  # the V3 class has no indexer keys
            for k in ("index_n_heads", "index_head_dim", "index_topk"):
                kw.pop(k)
        cfg = cfg_cls(**kw)
        torch.manual_seed(0)
        model = model_cls(cfg).to(device="cuda", dtype=torch.bfloat16)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        for L in args.seq_lens:
            B = max(1, args.tokens // L)
            ids = torch.randint(0, cfg.vocab_size, (B, L), device="cuda")
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

            def step():
                out = model(input_ids=ids, labels=ids, use_cache=False)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                ms = median_ms(step, warm=1, reps=3)
                rec = dict(bench="peer_train", model=name, seq_len=L, tokens=B * L, ms=ms,
                           tokens_per_s=B * L / (ms / 1e3), peak_gb=torch.cuda.max_memory_allocated() / 1e9)
            except torch.OutOfMemoryError:
                rec = dict(bench="peer_train", model=name, seq_len=L, tokens=B * L, error="out of memory")
            emit(args.json, rec)
            opt.zero_grad(set_to_none=True)
        del model, opt
        torch.cuda.empty_cache()


def warmup_peer(args):
    """The indexer warm-up step (SPEC.md §2 stage 1) written in PyTorch around transformers' frozen model."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    kw = dict(BENCH_SMALL)
    Hi, di = kw.pop("index_n_heads"), kw.pop("index_head_dim")
    kw.pop("index_topk")
    cfg = DeepseekV3Config(**kw)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    D, H, ql, kvl = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    mk = lambda *shape: torch.nn.Parameter(0.02 * torch.randn(*shape, device="cuda", dtype=torch.bfloat16))
    indexers = [dict(wq_b=mk(Hi * di, ql), wk=mk(di, D), wproj=mk(Hi, D),
                     ln_w=torch.nn.Parameter(torch.ones(di, device="cuda", dtype=torch.bfloat16)),
                     ln_b=torch.nn.Parameter(torch.zeros(di, device="cuda", dtype=torch.bfloat16)))
                for _ in range(cfg.num_hidden_layers)]
    params = [p for ix in indexers for p in ix.values()]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    scale, iscale = 1.0 / math.sqrt(dn + dr), 1.0 / math.sqrt(di)

    def rope_half(x, cos, sin):  # rotate-half RoPE on the last dim (the cost of either convention)
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def layer_kl(layer, ix, x, cos, sin, L, block=1024):
        at = layer.self_attn
        with torch.no_grad():  # the frozen main attention's q and k (MHA form)
            xn = layer.input_layernorm(x)
            cq = at.q_a_layernorm(at.q_a_proj(xn))
            q = at.q_b_proj(cq).view(L, H, dn + dr)
            kva = at.kv_a_proj_with_mqa(xn)
            kv = at.kv_b_proj(at.kv_a_layernorm(kva[:, :kvl])).view(L, H, dn + dv)
            kpe = rope_half(kva[:, kvl:], cos, sin).unsqueeze(1).expand(L, H, dr)
            q = torch.cat((q[..., :dn], rope_half(q[..., dn:], cos.unsqueeze(1), sin.unsqueeze(1))), -1)
            k = torch.cat((kv[..., :dn], kpe), -1)
            q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, L, 192]
        qi = (cq @ ix["wq_b"].t()).view(L, Hi, di)
        ki = torch.nn.functional.layer_norm(xn @ ix["wk"].t(), (di,), ix["ln_w"], ix["ln_b"], 1e-6)
        qi = torch.cat((rope_half(qi[..., :dr], cos.unsqueeze(1), sin.unsqueeze(1)), qi[..., dr:]), -1)
        ki = torch.cat((rope_half(ki[..., :dr], cos, sin), ki[..., dr:]), -1)
        w = (xn @ ix["wproj"].t()).float() * Hi ** -0.5
        qi_l, ki_l, w_l = (t.detach().requires_grad_() for t in (qi, ki, w))
        for t0 in range(0, L, block):
            t1 = min(L, t0 + block)
            mask = torch.arange(L, device="cuda").unsqueeze(0) > torch.arange(t0, t1, device="cuda").unsqueeze(1)
            with torch.no_grad():  # head-summed target, L1-normalized over s <= t
                s = (q[:, t0:t1] @ k.transpose(1, 2)).float() * scale
                p = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1).sum(0)
                p = p / p.sum(-1, keepdim=True)
            z = torch.relu(torch.einsum("bjd,sd->jbs", qi_l[t0:t1], ki_l)).float()
            I = torch.einsum("jbs,bj->bs", z, w_l[t0:t1]) * iscale
            logq = torch.log_softmax(I.masked_fill(mask, float("-inf")), dim=-1)
            kl = (p * (torch.log(p.clamp_min(1e-30)) - logq.masked_fill(mask, 0.0))).sum()
            kl.backward()
        torch.autograd.backward([qi, ki, w], [qi_l.grad, ki_l.grad, w_l.grad])

    for L in args.seq_lens:
        B = max(1, args.tokens // L)
        ids = torch.randint(0, cfg.vocab_size, (B, L), device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

        def step():
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            pos = torch.arange(L, device="cuda", dtype=torch.float32)
            theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 1e4)
            inv = 1.0 / (theta ** (torch.arange(0, dr, 2, device="cuda", dtype=torch.float32) / dr))
            ang = torch.outer(pos, inv)
            cos = torch.cat((ang.cos(), ang.cos()), -1).to(torch.bfloat16)
            sin = torch.cat((ang.sin(), ang.sin()), -1).to(torch.bfloat16)
            for b in range(B):
                for l, layer in enumerate(model.model.layers):
                    layer_kl(layer, indexers[l], hs[l][b], cos, sin, L)
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            ms = median_ms(step, warm=1, reps=3)
            rec = dict(bench="peer_train", model="PyTorch warm-up step", seq_len=L, tokens=B * L, ms=ms,
                       tokens_per_s=B * L / (ms / 1e3), peak_gb=torch.cuda.max_memory_allocated() / 1e9)
        except torch.OutOfMemoryError:
            rec = dict(bench="peer_train", model="PyTorch warm-up step", seq_len=L, tokens=B * L,
                       error="out of memory")
        emit(args.json, rec)
    del model, opt
    torch.cuda.empty_cache()


def kernel_peers(args):
    T, H, dqk, dv = args.seq_len, 128, 192, 128
    dt = torch.bfloat16
    q = torch.randn(1, H, T, dqk, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(1, H, T, dqk, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(1, H, T, dv, device="cuda", dtype=dt, requires_grad=True)
    fl = 2.0 * H * (T * T / 2) * (dqk + dv)
    # SDPA's own dispatch: flash needs equal q/k and v head dims, so 192/128 runs on cuDNN's fused
    # attention (or the next available backend).
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    try:
        ms = median_ms(f)
        emit(args.json, dict(bench="peer_kernel", name="dense attention fwd (MHA 192/128)", ms=ms, tflops=fl / ms / 1e9))
        o = f()
        g = torch.randn_like(o)
        ms_b = median_ms(lambda: torch.autograd.grad(f(), (q, k, v), g)) - ms
        emit(args.json, dict(bench="peer_kernel", name="dense attention bwd (MHA 192/128)", ms=ms_b,
                             tflops=2.5 * fl / ms_b / 1e9))
    except RuntimeError as e:
        emit(args.json, dict(bench="peer_kernel", name="dense attention fwd (MHA 192/128)", error=str(e)[:80]))
    del q, k, v
    # The FP8 GEMM ceiling the indexer's scoring is measured against: cuBLASLt e4m3 x e4m3 -> bf16.
    try:
        n = 8192
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        ms = median_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        emit(args.json, dict(bench="peer_kernel", name="fp8 GEMM ceiling (8192^3)", ms=ms, tflops=2 * n**3 / ms / 1e9))
        del a, b
    except (RuntimeError, AttributeError) as e:
        emit(args.json, dict(bench="peer_kernel", name="fp8 GEMM ceiling (8192^3)", error=str(e)[:80]))
    for L in (T, 4 * T):
        scores = torch.randn(L, L, device="cuda", dtype=torch.float32)
        ms = median_ms(lambda: torch.topk(scores, 2048, dim=-1))
        emit(args.json, dict(bench="peer_kernel", name=f"indexer top-k fp8 (T={L})", ms=ms, what="torch.topk only"))
        del scores
    # Sparse MLA by gather (MQA form): each query's k latent rows gathered, all heads attend to them.
    Ts, K, dl, dr = args.sparse_seq_len, 2048, 512, 64
    qs = torch.randn(Ts, H, dl + dr, device="cuda", dtype=dt, requires_grad=True)
    kv = torch.randn(Ts, dl + dr, device="cuda", dtype=dt, requires_grad=True)
    t = torch.arange(Ts, device="cuda").unsqueeze(1)
    idx = (torch.rand(Ts, K, device="cuda") * (t + 1)).long().clamp(max=Ts - 1)
    idx = torch.where(torch.arange(K, device="cuda").unsqueeze(0) <= t, torch.minimum(idx, t), t)
    scale = 1.0 / math.sqrt(192)

    def sparse_fwd():
        rows = kv[idx]                                      # [Ts, K, dl+dr]
        s = torch.einsum("thd,tkd->thk", qs, rows) * scale
        p = torch.softmax(s.float(), dim=-1).to(dt)
        return torch.einsum("thk,tkd->thd", p, rows[..., :dl])

    fl_s = 2.0 * Ts * K * H * ((dl + dr) + dl)
    try:
        ms = median_ms(sparse_fwd)
        emit(args.json, dict(bench="peer_kernel", name="sparse MLA attention fwd", ms=ms, tflops=fl_s / ms / 1e9))
        o = sparse_fwd()
        g = torch.randn_like(o)
        ms_fb = median_ms(lambda: torch.autograd.grad(sparse_fwd(), (qs, kv), g))
        emit(args.json, dict(bench="peer_kernel", name="sparse MLA attention bwd", ms=ms_fb - ms,
                             tflops=2.5 * fl_s / (ms_fb - ms) / 1e9))
    except torch.OutOfMemoryError:
        emit(args.json, dict(bench="peer_kernel", name="sparse MLA attention fwd", error="out of memory"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--seq-lens", default="4096,16384")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--sparse-seq-len", type=int, default=4096)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-warmup", action="store_true")
    args = ap.parse_args()
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")]
    if not torch.cuda.is_available():
        print("[bench_peers] no GPU", file=sys.stderr)
        return 1
    if not args.skip_kernels:
        try:
            kernel_peers(args)
        except Exception as e:  # a failed peer must not hide the others
            print(f"[bench_peers] kernels: {e}", file=sys.stderr)
        torch.cuda.empty_cache()
    if not args.skip_train:
        train_peers(args)
    if not args.skip_warmup:
        try:
            warmup_peer(args)
        except Exception as e:
            print(f"[bench_peers] warmup: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
