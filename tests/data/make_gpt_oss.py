#!/usr/bin/env python3
"""Writes the gpt_oss fixture tests/data/gpt_oss-basic/ (the layout of tests/data/README.md).

An independent implementation of one gpt-oss MoE block, written from Hugging Face's
GptOssTopKRouter and GptOssExperts (transformers' modeling_gpt_oss.py), in float64 PyTorch:
    logits = x W_router^T + b_router; the k largest; weights = softmax of those k logits
    gate_up = x gate_up_proj[e] + gate_up_proj_bias[e]          ([d, 2 ff]: x @ W, not W^T)
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]              (interleaved)
    gate = gate.clamp(max=7); up = up.clamp(-7, 7)
    h = (up + 1) * gate * sigmoid(1.702 gate)
    y += weight * (h down_proj[e] + down_proj_bias[e])
model.safetensors holds Hugging Face's own fused tensors (dequantised, F32), as
GptOssForCausalLM saves them, with unrelated attention and norm tensors beside them.
grads.safetensors: float64 autograd of L = sum(y * dy) through the same forward, and the
auxiliary losses of tests/data/README.md ("Backward") with p = softmax(router logits, bias
included).

Needs python3-torch (Debian); not used by the build or the tests:
    /usr/bin/python3 tests/data/make_gpt_oss.py
"""

import json
import os
import struct
import zlib

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt_oss-basic")
D, FF, E, K, LAYERS, T, LAYER = 32, 64, 8, 4, 2, 8, 1
ALPHA, LIMIT = 1.702, 7.0


def write_safetensors(path, tensors, metadata):
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    names = {torch.float32: "F32", torch.float64: "F64", torch.int32: "I32"}
    for name, t in tensors.items():
        b = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def block(x, w, l):
    p = f"model.layers.{l}.mlp."
    x = x.double()
    logits = x @ w[p + "router.weight"].double().T + w[p + "router.bias"].double()
    top, ids = torch.topk(logits, K, dim=-1)
    weights = torch.softmax(top, dim=-1)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(K):
            e = int(ids[t, j])
            gu = x[t] @ w[p + "experts.gate_up_proj"][e].double() + w[p + "experts.gate_up_proj_bias"][e].double()
            gate, up = gu[::2].clamp(max=LIMIT), gu[1::2].clamp(min=-LIMIT, max=LIMIT)
            h = (up + 1) * gate * torch.sigmoid(ALPHA * gate)
            out = h @ w[p + "experts.down_proj"][e].double() + w[p + "experts.down_proj_bias"][e].double()
            y[t] += weights[t, j] * out
    return y, logits, top, ids, weights


def main():
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        u = lambda *shape, scale: (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).float()
        w = {"model.embed_tokens.weight": u(50, D, scale=1.0), "model.norm.weight": u(D, scale=1.0)}
        for l in range(LAYERS):
            p = f"model.layers.{l}."
            w[p + "input_layernorm.weight"] = u(D, scale=1.0)
            w[p + "self_attn.q_proj.weight"] = u(D, D, scale=0.2)
            w[p + "self_attn.sinks"] = u(4, scale=1.0)
            w[p + "mlp.router.weight"] = u(E, D, scale=0.5)
            w[p + "mlp.router.bias"] = u(E, scale=0.5)
            # wide enough that some gate and up pre-activations pass the clamp at +-7
            w[p + "mlp.experts.gate_up_proj"] = u(E, D, 2 * FF, scale=0.9)
            w[p + "mlp.experts.gate_up_proj_bias"] = u(E, 2 * FF, scale=1.0)
            w[p + "mlp.experts.down_proj"] = u(E, FF, D, scale=0.15)
            w[p + "mlp.experts.down_proj_bias"] = u(E, D, scale=0.5)
        x = u(T, D, scale=2.0)
        y, logits, top, ids, weights = block(x, w, LAYER)
        # every selection at least 1e-3 from a tie: the k-th largest logit against the next
        s = torch.sort(logits, dim=-1, descending=True).values
        margin = float((s[:, K - 1] - s[:, K]).min())
        xd = x.double()
        p = f"model.layers.{LAYER}.mlp.experts."
        pre = torch.stack([xd @ w[p + "gate_up_proj"][e].double() + w[p + "gate_up_proj_bias"][e].double() for e in range(E)])
        clamped = int((pre[..., ::2] > LIMIT).sum()), int((pre[..., 1::2].abs() > LIMIT).sum())
        edge = float(((pre.abs() - LIMIT).abs()).min())  # no pre-activation at a clamp's kink
        if margin >= 1e-3 and min(clamped) >= 8 and edge >= 1e-3:
            break
    print(f"seed {seed}: routing margin {margin:.4f}, gate values above 7: {clamped[0]}, up values beyond +-7: {clamped[1]}")
    os.makedirs(OUT, exist_ok=True)
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": D, "intermediate_size": FF,
              "num_local_experts": E, "num_experts_per_tok": K, "num_hidden_layers": LAYERS, "swiglu_limit": LIMIT,
              "hidden_act": "silu", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
              "rms_norm_eps": 1e-5, "vocab_size": 50, "torch_dtype": "float32", "router_aux_loss_coef": 0.9,
              "output_router_logits": False}
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    write_safetensors(os.path.join(OUT, "model.safetensors"), w, {"format": "pt"})
    meta = {"family": "gpt_oss", "layer": str(LAYER)}
    write_safetensors(os.path.join(OUT, "input.safetensors"), {"x": x}, meta)
    write_safetensors(os.path.join(OUT, "expected.safetensors"),
                      {"y": y.float(), "y_f64": y, "expert_ids": ids.int(), "expert_weights": weights.float(),
                       "router_logits": logits.float()},
                      dict(meta, tie_rule="lower index first", tie_tokens="[]", tie_experts="[]"))
    write_grads(os.path.join(OUT, "grads.safetensors"), x, w, meta)


def write_grads(path, x, w, meta):
    case = os.path.basename(OUT)
    seed = zlib.crc32(case.encode())
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    p = f"model.layers.{LAYER}.mlp."
    names = [p + n for n in ("router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
                             "experts.down_proj", "experts.down_proj_bias")]
    params = {n: w[n].double().requires_grad_() for n in names}
    xd = x.double().requires_grad_()
    y, logits, _, ids, _ = block(xd, dict(w, **params), LAYER)
    (y * dy.double()).sum().backward()
    out = {"dy": dy, "dy_f64": dy.double(), "dx": xd.grad.float(), "dx_f64": xd.grad.clone()}
    for n in names:
        out["d/" + n] = params[n].grad.float()
    routers = names[:2]
    # Hugging Face's load_balancing_loss_func (one layer): E sum_e f_e P_e, f from the top-k picks
    for key, loss_of in (("switch_lb", lambda lg: E * (torch.bincount(ids.flatten(), minlength=E).double() / T
                                                        * torch.softmax(lg, -1).mean(0)).sum()),
                         ("z_loss", lambda lg: (torch.logsumexp(lg, -1) ** 2).mean())):
        rp = {n: w[n].double().requires_grad_() for n in routers}
        lg = x.double() @ rp[routers[0]].T + rp[routers[1]]
        loss = loss_of(lg)
        loss.backward()
        out["aux/" + key] = loss.detach().reshape(1)
        prefix = "d_aux_lb/" if key == "switch_lb" else "d_aux_z/"
        for n in routers:
            out[prefix + n] = rp[n].grad.float()
    write_safetensors(path, out, dict(meta, case=case, dy_seed=str(seed), loss="L = sum(y * dy)",
                                      aux_switch_lb="E * sum_e f_e * P_e", aux_z_loss="mean_t logsumexp(logits_t)^2"))


if __name__ == "__main__":
    main()
