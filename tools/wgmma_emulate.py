#!/usr/bin/env python3
# Emulates the wgmma sparse attention kernels' shared-memory descriptors and thread mappings on the CPU
# (NumPy), for kernel edits made without a GPU: a model of wgmma reading no-swizzle tiles as CUTLASS's
# canonical layouts describe them (cute/atom/mma_traits_sm90_gmma.hpp: K-major ((8,m),(T,2)):((1T,SBO),(1,LBO)),
# MN-major ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)), T = 8 bf16; lbo = K-adjacent core matrices, sbo = M/N-adjacent)
# and of the accumulator / register-A fragment layouts documented in kernels/cuda/mma.cuh. It checks
#   - sm90_bf16_sparse_attention_fwd_wgmma.cu: the S and P V descriptors (both head dims);
#   - sm90_bf16_sparse_attention_bwd_wgmma.cu: S, dP, the dQ and dKV pieces' descriptors;
#   - sm90_bf16_sparse_attention_wgmma_h16.cu: S^T, dP^T, the dKV pieces (A from registers), dS^T's store
#     and dQ^T's descriptors, then the forward and backward thread by thread against a NumPy reference.
# It validates the arithmetic under that model, not the hardware: the GPU tests (GpuDsa.SparseAttentionWgmma)
# are the judge. Usage: python3 tools/wgmma_emulate.py (Debian: python3-numpy).
import numpy as np
rng = np.random.default_rng(0)

def tile_off(r, c, LD):
    return ((r >> 3) * (LD >> 3) + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7)

def read_kmajor(smem, start, lbo, sbo, MN, K=16):
    out = np.zeros((MN, K))
    for mn in range(MN):
        for k in range(K):
            byte = start * 2 + (mn % 8) * 16 + (mn // 8) * sbo + (k % 8) * 2 + (k // 8) * lbo
            assert byte % 2 == 0
            out[mn, k] = smem[byte // 2]
    return out

def read_mnmajor(smem, start, lbo, sbo, MN, K=16):
    out = np.zeros((MN, K))
    for mn in range(MN):
        for k in range(K):
            byte = start * 2 + (mn % 8) * 2 + (mn // 8) * sbo + (k % 8) * 16 + (k // 8) * lbo
            out[mn, k] = smem[byte // 2]
    return out

def fwd(DK, DV):
    Q = rng.standard_normal((64, DK)); KV = rng.standard_normal((64, DK))
    sQ = np.zeros(64 * DK); st = np.zeros(64 * DK + 4096)
    for r in range(64):
        for c in range(DK):
            sQ[tile_off(r, c, DK)] = Q[r, c]; st[tile_off(r, c, DK)] = KV[r, c]
    for wg in range(2):
        S = np.zeros((64, 32))
        for ks in range(DK // 16):
            A = read_kmajor(sQ, ks * 128, 128, DK * 16, 64)
            B = read_kmajor(st, 4 * wg * (DK // 8) * 64 + ks * 128, 128, DK * 16, 32)
            S += A @ B.T
        assert np.allclose(S, Q @ KV[32 * wg:32 * wg + 32].T), "S"
    P = rng.standard_normal((64, 64)); sP = np.zeros(64 * 64)
    for r in range(64):
        for k in range(64):
            sP[tile_off(r, k, 64)] = P[r, k]
    for wg in range(2):
        for nb in range(DV // 256):
            col0 = wg * (DV // 2) + nb * 128
            O = np.zeros((64, 128))
            for ks in range(4):
                A = read_kmajor(sP, ks * 128, 128, 64 * 16, 64)
                B = read_mnmajor(st, 2 * ks * (DK // 8) * 64 + (col0 // 8) * 64, DK * 16, 128, 128)  # [n][k]
                O += A @ B.T
            assert np.allclose(O, P @ KV[:, col0:col0 + 128]), "PV"
    print("fwd", DK, DV, "ok")

def bwd(DK, DV):
    Q = rng.standard_normal((16, DK)); dO = rng.standard_normal((16, DV)); KV = rng.standard_normal((64, DK))
    sQ = np.zeros(16 * DK); sdO = np.zeros(16 * DV); st = np.full(64 * DK + 4096, np.nan)
    for r in range(16):
        for c in range(DK): sQ[tile_off(r, c, DK)] = Q[r, c]
        for c in range(DV): sdO[tile_off(r, c, DV)] = dO[r, c]
    for r in range(64):
        for c in range(DK): st[tile_off(r, c, DK)] = KV[r, c]
    S = sum(read_kmajor(st, ks * 128, 128, DK * 16, 64) @ read_kmajor(sQ, ks * 128, 128, DK * 16, 16).T for ks in range(DK // 16))
    assert np.allclose(S, KV @ Q.T), "S^T"
    dP = sum(read_kmajor(st, ks * 128, 128, DK * 16, 64) @ read_kmajor(sdO, ks * 128, 128, DV * 16, 16).T for ks in range(DV // 16))
    assert np.allclose(dP, KV[:, :DV] @ dO.T), "dP^T"
    dS = rng.standard_normal((64, 16)); P = rng.standard_normal((64, 16))
    # dKV pieces: A = dS^T (registers), B = MN-major views of sQ / sdO
    for n0 in range(0, DK, 96):
        acc = dS @ read_mnmajor(sQ, (n0 // 8) * 64, DK * 16, 128, 96).T
        ref = dS @ Q[:, n0:n0 + 96]
        if DV - n0 >= 32:
            nv = 96 if DV - n0 >= 96 else (64 if DV - n0 >= 64 else 32)
            acc[:, :nv] += P @ read_mnmajor(sdO, (n0 // 8) * 64, DV * 16, 128, nv).T
            ref[:, :nv] += P @ dO[:, n0:n0 + nv]
        assert np.allclose(acc, ref), "dKV piece %d" % n0
    # dS^T to sdS as the kernel's threads store it, then dQ^T
    sdS = np.zeros(64 * 16)
    for wi in range(4):
        for lane in range(32):
            g, c = lane // 4, lane % 4; r0 = 16 * wi + g
            for j in range(2):
                h = 8 * j + 2 * c
                for e in range(2):
                    sdS[((r0 >> 3) * 2 + j) * 64 + (r0 & 7) * 8 + (h & 7) + e] = dS[r0, h + e]
                    sdS[(((r0 + 8) >> 3) * 2 + j) * 64 + (r0 & 7) * 8 + (h & 7) + e] = dS[r0 + 8, h + e]
    kM = (DK + 63) // 64
    for mc in range(kM):
        acc = np.zeros((64, 16))
        for ks in range(4):
            A = read_mnmajor(st, (2 * ks * (DK // 8) + 8 * mc) * 64, DK * 16, 128, 64)   # [m=dim][k=key]
            B = read_mnmajor(sdS, 2 * ks * 2 * 64, 256, 128, 16)                          # [n=head][k=key]
            acc += np.nan_to_num(A, nan=1e30) @ B.T
        rows = min(64, DK - 64 * mc)
        assert np.allclose(acc[:rows], (KV.T @ dS)[64 * mc:64 * mc + rows]), "dQ^T piece %d" % mc
    print("bwd", DK, DV, "ok")


def acc_of(D):  # D [64, N] -> per-thread arrays acc[wi][lane][4*(N//8)]
    N = D.shape[1]; out = np.zeros((4, 32, N // 2))
    for wi in range(4):
        for lane in range(32):
            g, c = lane // 4, lane % 4
            for j in range(N // 8):
                for e in range(4):
                    out[wi, lane, 4 * j + e] = D[16 * wi + g + 8 * (e // 2), 8 * j + 2 * c + e % 2]
    return out
def a_from_regs(frag):  # frag[wi][lane][8] = (g,2c),(g,2c+1),(g+8,2c),(g+8,2c+1),(g,2c+8),(g,2c+9),(g+8,2c+8),(g+8,2c+9)
    A = np.full((64, 16), np.nan)
    for wi in range(4):
        for lane in range(32):
            g, c = lane // 4, lane % 4; r = 16 * wi + g
            v = frag[wi, lane]
            A[r, 2 * c], A[r, 2 * c + 1], A[r + 8, 2 * c], A[r + 8, 2 * c + 1] = v[0:4]
            A[r, 2 * c + 8], A[r, 2 * c + 9], A[r + 8, 2 * c + 8], A[r + 8, 2 * c + 9] = v[4:8]
    assert not np.isnan(A).any()
    return A

def reference(Q, KVr, dO, valid, scale, Dv):
    S = Q @ KVr.T * scale; S[:, ~valid] = -np.inf
    m = S.max(1, keepdims=True); P = np.exp(S - m); l = P.sum(1, keepdims=True); P /= l
    O = P @ KVr[:, :Dv]; lse = (m + np.log(l))[:, 0]
    dP = dO @ KVr[:, :Dv].T; delta = (dO * O).sum(1, keepdims=True); dS = P * (dP - delta) * scale
    dQ = dS @ KVr; dKV = dS.T @ Q; dKV[:, :Dv] += P.T @ dO
    return O, lse, dQ, dKV, P.sum(0), delta[:, 0]

def fwd_emu(Q, KVr, valid, scale, Dv, nblk):
    sl2 = scale / np.log(2)
    o = np.zeros((Dv // 64, 4, 32, 8)); m_run = np.full((4, 32, 2, 2), -np.inf); l_part = np.zeros((4, 32, 2, 2))
    for blk in range(nblk):
        rows = slice(64 * blk, 64 * blk + 64); Kb = KVr[rows]; ok = valid[rows]
        s = acc_of(Kb @ Q.T)  # S^T [64 keys, 16 heads]
        red = np.zeros((4, 16)); S = np.zeros((4, 32, 8))
        for wi in range(4):
            for lane in range(32):
                g, c = lane // 4, lane % 4; r0 = 16 * wi + g
                for j in range(2):
                    for e in range(2):
                        S[wi, lane, 4*j+e] = s[wi, lane, 4*j+e] * sl2 if ok[r0] else -np.inf
                        S[wi, lane, 4*j+2+e] = s[wi, lane, 4*j+2+e] * sl2 if ok[r0 + 8] else -np.inf
        # warp max over g (lanes 4 apart) then red
        for wi in range(4):
            for c in range(4):
                for j in range(2):
                    for e in range(2):
                        m = max(max(S[wi, g*4+c, 4*j+e], S[wi, g*4+c, 4*j+2+e]) for g in range(8))
                        red[wi, 8*j + 2*c + e] = m
        Pt = np.zeros((64, 16))
        for wi in range(4):
            for lane in range(32):
                g, c = lane // 4, lane % 4; r0 = 16 * wi + g
                alpha = np.zeros((2, 2)); mu = np.zeros((2, 2))
                for j in range(2):
                    for e in range(2):
                        col = 8*j + 2*c + e; bm = red[:, col].max()
                        mn = max(m_run[wi, lane, j, e], bm)
                        alpha[j, e] = 1.0 if mn == -np.inf else 2.0 ** (m_run[wi, lane, j, e] - mn)
                        mu[j, e] = 0.0 if mn == -np.inf else mn
                        m_run[wi, lane, j, e] = mn; l_part[wi, lane, j, e] *= alpha[j, e]
                for j in range(2):
                    for e in range(4):
                        pr = 2.0 ** (S[wi, lane, 4*j+e] - mu[j, e % 2]); l_part[wi, lane, j, e % 2] += pr
                        Pt[r0 + 8 * (e // 2), 8*j + 2*c + e % 2] = pr
                for mc in range(Dv // 64):
                    for i in range(8): o[mc, wi, lane, i] *= alpha[i // 4, i % 2]
        for mc in range(Dv // 64):
            o[mc] += acc_of(Kb[:, 64*mc:64*mc+64].T @ Pt)   # O^T piece [64 dims, 16 heads]
    # final
    red = np.zeros((4, 16))
    for wi in range(4):
        for c in range(4):
            for j in range(2):
                for e in range(2):
                    red[wi, 8*j+2*c+e] = sum(l_part[wi, g*4+c, j, e] for g in range(8))
    O = np.zeros((16, Dv)); lse = np.zeros(16)
    for wi in range(4):
        for lane in range(32):
            g, c = lane // 4, lane % 4
            l = np.zeros((2, 2))
            for j in range(2):
                for e in range(2):
                    col = 8*j+2*c+e; l[j, e] = red[:, col].sum()
                    lse[col] = m_run[wi, lane, j, e] * np.log(2) + np.log(l[j, e])
            for mc in range(Dv // 64):
                for i in range(8):
                    j, e = i // 4, i % 4; dim = 64*mc + 16*wi + g + 8*(e//2); h = 8*j + 2*c + e % 2
                    O[h, dim] = o[mc, wi, lane, i] / l[j, e % 2]
    return O, lse

def bwd_emu(Q, KVr, dO, valid, scale, Dv, lse, delta, nblk):
    sl2 = scale / np.log(2); Dk = Q.shape[1]; kM = (Dk + 63) // 64
    dq = np.zeros((kM, 4, 32, 8)); dKV = np.zeros((64 * nblk, Dk)); probs = np.zeros(64 * nblk)
    for blk in range(nblk):
        rows = slice(64 * blk, 64 * blk + 64); Kb = KVr[rows]; ok = valid[rows]
        s = acc_of(Kb @ Q.T); dp = acc_of(Kb[:, :Dv] @ dO.T)
        fr_ds = np.zeros((4, 32, 8)); fr_p = np.zeros((4, 32, 8))
        for wi in range(4):
            for lane in range(32):
                g, c = lane // 4, lane % 4; r0 = 16 * wi + g
                pv = np.zeros(8); dsv = np.zeros(8)
                for j in range(2):
                    for e in range(4):
                        i = 4*j+e; h = 8*j + 2*c + e % 2
                        okr = ok[r0] if e < 2 else ok[r0 + 8]
                        pv[i] = 2.0 ** (s[wi, lane, i] * sl2 - lse[h] / np.log(2)) if okr else 0.0
                        dsv[i] = pv[i] * (dp[wi, lane, i] - delta[h]) * scale
                probs[64*blk + r0] += pv[0] + pv[1] + pv[4] + pv[5]
                probs[64*blk + r0 + 8] += pv[2] + pv[3] + pv[6] + pv[7]
                # a regs: {pack(ds0,ds1), pack(ds2,ds3), pack(ds4,ds5), pack(ds6,ds7)}
                fr_ds[wi, lane] = dsv; fr_p[wi, lane] = pv
        dsT = a_from_regs(fr_ds); pT = a_from_regs(fr_p)
        # dKV pieces
        for n0 in range(0, Dk, 96):
            acc = dsT @ Q[:, n0:n0+96]
            if Dv - n0 >= 32:
                nv = 96 if Dv - n0 >= 96 else (64 if Dv - n0 >= 64 else 32)
                acc[:, :nv] += pT @ dO[:, n0:n0+nv]
            a = acc_of(acc)
            # scatter: even c takes group 2m's 4 consecutive columns, odd c group 2m+1's
            for wi in range(4):
                for lane in range(32):
                    g, c = lane // 4, lane % 4; r0 = 16*wi + g; odd = c & 1; partner = lane ^ 1
                    for i in range(2):
                        r = r0 + 8 * i
                        for m in range(96 // 16):
                            a0 = a[wi, lane, 8*m:8*m+4]; a1 = a[wi, lane, 8*m+4:8*m+8]
                            p0 = a[wi, partner, 8*m:8*m+4]; p1 = a[wi, partner, 8*m+4:8*m+8]
                            # partner sends: (odd partner sends its group0 vals) / (even partner sends group1)
                            sx = p0[2*i] if (partner & 1) else p1[2*i]; sy = p0[2*i+1] if (partner & 1) else p1[2*i+1]
                            v = [sx, sy, a1[2*i], a1[2*i+1]] if odd else [a0[2*i], a0[2*i+1], sx, sy]
                            col = n0 + 16*m + (8 + 2*(c-1) if odd else 2*c)
                            if ok[r]: dKV[64*blk + r, col:col+4] += v
        # dQ^T pieces (rows past Dk read the next rows' data: here zeros/next block)
        for mc in range(kM):
            A = np.zeros((64, 64))
            for d in range(64):
                dim = 64*mc + d
                A[d] = KVr[rows, dim] if dim < Dk else 0.0  # rows past Dk: never stored by the kernel
            dq[mc] += acc_of(A @ dsT)
    dQ = np.zeros((16, Dk))
    for mc in range(kM):
        for wi in range(4):
            for lane in range(32):
                g, c = lane // 4, lane % 4
                for j in range(2):
                    for e in range(4):
                        dim = 64*mc + 16*wi + g + 8*(e//2); h = 8*j + 2*c + e % 2
                        if dim < Dk: dQ[h, dim] = dq[mc, wi, lane, 4*j+e]
    return dQ, dKV, probs

for Dk, Dv, K in ((288, 256, 100), (576, 512, 64)):
    nblk = (K + 63) // 64
    Q = rng.standard_normal((16, Dk)); dO = rng.standard_normal((16, Dv))
    KVr = rng.standard_normal((64 * nblk, Dk)); valid = rng.random(64 * nblk) > 0.2; valid[K:] = False
    KVr[~valid] = 0.0
    scale = 1 / np.sqrt(Dk)
    O, lse, dQ, dKV, probs, delta = reference(Q, KVr, dO, valid, scale, Dv)
    Oe, lsee = fwd_emu(Q, KVr, valid, scale, Dv, nblk)
    assert np.allclose(Oe, O) and np.allclose(lsee, lse), "fwd"
    dQe, dKVe, pe = bwd_emu(Q, KVr, dO, valid, scale, Dv, lse, delta, nblk)
    dKV[~valid] = 0
    assert np.allclose(dQe, dQ), "dQ"; assert np.allclose(dKVe, dKV), "dKV"; assert np.allclose(pe, probs), "probs"
    print("h16", Dk, Dv, K, "ok")
fwd(288, 256); fwd(576, 512); bwd(288, 256); bwd(576, 512)

def bwd64():  # sm90_bf16_sparse_attention_bwd_wgmma.cu (Dk 576, Dv 512, 64 heads)
    DK, DV = 576, 512
    Q = rng.standard_normal((64, DK)); dO = rng.standard_normal((64, DV)); KV = rng.standard_normal((64, DK))
    P = rng.standard_normal((64, 64)); dS = rng.standard_normal((64, 64))  # [heads][keys]
    sQ = np.zeros(64 * DK); sdO = np.zeros(64 * DV); st = np.zeros(64 * DK); sP = np.zeros(64 * 64); sdS = np.zeros(64 * 64)
    for r in range(64):
        for c in range(DK): sQ[tile_off(r, c, DK)] = Q[r, c]; st[tile_off(r, c, DK)] = KV[r, c]
        for c in range(DV): sdO[tile_off(r, c, DV)] = dO[r, c]
        for k in range(64): sP[tile_off(r, k, 64)] = P[r, k]; sdS[tile_off(r, k, 64)] = dS[r, k]
    for wg in range(2):
        kv_w = 4 * wg * (DK // 8) * 64
        S = sum(read_kmajor(sQ, ks * 128, 128, DK * 16, 64) @ read_kmajor(st, kv_w + ks * 128, 128, DK * 16, 32).T for ks in range(DK // 16))
        assert np.allclose(S, Q @ KV[32 * wg:32 * wg + 32].T), "S_w"
        dP = sum(read_kmajor(sdO, ks * 128, 128, DV * 16, 64) @ read_kmajor(st, kv_w + ks * 128, 128, DK * 16, 32).T for ks in range(DV // 16))
        assert np.allclose(dP, dO @ KV[32 * wg:32 * wg + 32, :DV].T), "dP_w"
        for pc in range(3):
            n0 = wg * (DK // 2) + pc * 96
            dq = sum(read_kmajor(sdS, ks * 128, 128, 64 * 16, 64) @ read_mnmajor(st, (2 * ks * (DK // 8) + n0 // 8) * 64, DK * 16, 128, 96).T for ks in range(4))
            assert np.allclose(dq, dS @ KV[:, n0:n0 + 96]), "dQ piece"
            acc = sum(read_mnmajor(sdS, 2 * ks * 8 * 64, 64 * 16, 128, 64) @ read_mnmajor(sQ, (2 * ks * (DK // 8) + n0 // 8) * 64, DK * 16, 128, 96).T for ks in range(4))
            ref = dS.T @ Q[:, n0:n0 + 96]
            nv = 96 if DV - n0 >= 96 else (32 if DV - n0 == 32 else 0)
            if nv:
                acc[:, :nv] += sum(read_mnmajor(sP, 2 * ks * 8 * 64, 64 * 16, 128, 64) @ read_mnmajor(sdO, (2 * ks * (DV // 8) + n0 // 8) * 64, DV * 16, 128, nv).T for ks in range(4))
                ref[:, :nv] += P.T @ dO[:, n0:n0 + nv]
            assert np.allclose(acc, ref), "dKV piece %d" % n0
    print("bwd64 576 512 ok")

bwd64()
