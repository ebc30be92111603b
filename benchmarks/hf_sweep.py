"""Hugging Face architectures beyond the test families, each from a tiny random config.

`python benchmarks/hf_sweep.py 2,4 falcon,gpt_oss,...` prints a JSON line per model and tp: the
check of loss, outputs and every gradient against the unsharded model (`verify_config` in the
simulator), autoshard's own warnings, and which matrices stay whole. Each model runs in a
process of its own (a crash or a hang costs one row). The table in RESULTS.md ("Hugging Face
architectures outside the test families") is made from these lines.
"""

import json
import subprocess
import sys
import traceback
import warnings

# small sizes under every name a config may use; names a config rejects are dropped
BASE = dict(
    vocab_size=64,
    hidden_size=32,
    d_model=32,
    n_embd=32,
    intermediate_size=64,
    ffn_dim=64,
    num_hidden_layers=2,
    n_layer=2,
    num_layers=2,
    encoder_layers=2,
    decoder_layers=2,
    num_attention_heads=4,
    n_head=4,
    num_heads=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    d_kv=8,
    d_ff=64,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    n_positions=64,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=0,
    tie_word_embeddings=False,
)


def one(mt, tp):
    from transformers import AutoConfig

    from nxd_autoshard import autoshard
    from nxd_autoshard.ir.placements import Replicate
    from nxd_autoshard.tools.hf import build_model, random_batch
    from nxd_autoshard.tools.verify import verify_config

    kw = dict(BASE)
    for _ in range(40):
        try:
            cfg = AutoConfig.for_model(mt, **kw)
            break
        except Exception as e:
            msg = str(e)
            bad = [k for k in list(kw) if f"'{k}'" in msg or f"`{k}`" in msg or f" {k} " in msg]
            if not bad:
                return {"model": mt, "tp": tp, "status": "crash-setup", "err": msg[:300]}
            for k in bad:
                kw.pop(k)
    rec = {"model": mt, "tp": tp}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            checks = verify_config(cfg, tp, world="sim", seq=8)
        except Exception as e:
            tb = traceback.format_exc()
            ours = (
                "nxd_autoshard" in tb.split("verify_config")[-1] if "verify_config" in tb else False
            )
            kind = type(e).__name__
            status = (
                "refused"
                if kind in ("PlanError", "ValueError", "NotImplementedError")
                and "nxd_autoshard" in tb
                else ("crash-ours" if ours else "crash-setup")
            )
            rec.update(
                status=status,
                err=f"{kind}: {str(e)[:400]}",
                where=tb.strip().splitlines()[-3][:200],
            )
            return rec
    bad = [c for c in checks if not c.ok]
    worst = max(checks, key=lambda c: c.max_abs if c.max_abs == c.max_abs else 1e9)
    rec.update(
        status="ok" if not bad else "MISMATCH",
        checks=len(checks),
        max_abs=float(worst.max_abs),
        worst=worst.name,
        bad=[c.name for c in bad][:5],
    )
    ours = sorted(
        {
            str(w.message)[:220]
            for w in caught
            if "nxd_autoshard" in (w.filename or "") or "autoshard" in str(w.message)[:400]
        }
    )
    rec["warnings"] = ours[:6]
    try:
        model = build_model(cfg, seed=0)
        args, kwargs = random_batch(model, batch=2, seq=8, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = autoshard(model, tp, example_inputs=args, example_kwargs=kwargs)
            s(*args, **kwargs)
        mats = {n: p for n, p in s.named_parameters() if p.dim() >= 2}
        rep = [n for n in mats if isinstance(s.placements.get(n), Replicate)]
        rec["matrices"] = len(mats)
        rec["replicated"] = len(rep)
        rec["replicated_names"] = rep[:8]
    except Exception as e:
        rec["placement_err"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rec


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print("RESULT " + json.dumps(one(sys.argv[2], int(sys.argv[3]))), flush=True)
        sys.exit(0)
    tps = [int(t) for t in sys.argv[1].split(",")]
    for mt in sys.argv[2].split(","):
        for tp in tps:
            try:
                r = subprocess.run(
                    [sys.executable, __file__, "--one", mt, str(tp)],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                line = [s for s in r.stdout.splitlines() if s.startswith("RESULT ")]
                print(
                    line[-1][7:]
                    if line
                    else json.dumps(
                        {"model": mt, "tp": tp, "status": "crash-process", "err": r.stderr[-400:]}
                    ),
                    flush=True,
                )
            except subprocess.TimeoutExpired:
                print(json.dumps({"model": mt, "tp": tp, "status": "timeout"}), flush=True)
