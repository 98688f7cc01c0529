"""KV format quality table: teacher-forced top-1 agreement with the unquantized run and perplexity, per format.

    python -m bench.kv_quality [--model PATH] [--tokens 1024] [--dtype float32]

Runs on the CPU in about a minute with the default model; writes bench/results/kv_quality.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import date
from pathlib import Path

import torch

from kvrelay.tokenizer import Tokenizer
from services.model.default_model import resolve_model
from services.model.kv_quality import measure

ROOT = Path(__file__).resolve().parent.parent

FORMATS = ["bf16", "fp8", "int8", "k=int8,v=bf16", "k=fp8,v=bf16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--text", default=str(ROOT / "tests" / "data" / "english.txt"))
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    ids = Tokenizer.from_dir(model_dir).encode(Path(args.text).read_text())[: args.tokens]
    ref_ppl, rows = measure(model_dir, ids, FORMATS, dtype=args.dtype)
    # MI300X's fp8 (e4m3fnuz, max 240) on any device, by the same method: the pool's fp8 flavour forced
    _, fnuz = measure(model_dir, ids, ["fp8"], dtype=args.dtype, fp8=torch.float8_e4m3fnuz)
    rows += [dataclasses.replace(r, kv_dtype="fp8 e4m3fnuz (MI300X)") for r in fnuz]
    print(f"model {model_dir.name}, {len(ids)} tokens teacher-forced, weights {args.dtype}, reference KV {args.dtype}")
    print(f"{'kv format':<24}{'bytes/token':>12}{'top-1 agree':>13}{'perplexity':>12}{'ppl vs bf16':>13}")
    print(f"{'(reference)':<24}{'':>12}{'100.00%':>13}{ref_ppl:>12.3f}{'':>13}")
    bf16_ppl = next(r.perplexity for r in rows if r.kv_dtype == "bf16")
    for r in rows:
        delta = (r.perplexity / bf16_ppl - 1) * 100
        print(
            f"{r.kv_dtype:<24}{r.bytes_per_token:>12}{r.top1_agreement * 100:>12.2f}%"
            f"{r.perplexity:>12.3f}{delta:>+12.2f}%"
        )
    out = ROOT / "bench" / "results" / "kv_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": model_dir.name,
        "tokens": len(ids),
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": date.today().isoformat(),
        "reference_perplexity": ref_ppl,
        "rows": [r.__dict__ for r in rows],
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
