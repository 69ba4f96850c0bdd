"""fastformer.models from another checkout ("before") against this one ("after"), and both against
transformers, interleaved in one process on the same ops: the models/ refactor's speed check.

    python bench/bench_models_ab.py --old /path/to/old/checkout [--rounds 5] [--new-tokens 64]

The old checkout's ``fastformer/models`` package is loaded under another name; it runs on this
checkout's ``fastformer`` ops (so only the model code differs). Same weights in all three
(state_dict keys are unchanged). CPU, fp32, bench_models.py's CPU GPT shape. Prints times and
ratios (``after/before`` < 1: faster now).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import _hf_sdpa, _train_step, paired_wall  # noqa: E402

from fastformer.models import GPT, GPTConfig  # noqa: E402


def load_old_models(checkout: Path):
    pkg = checkout / "fastformer" / "models"
    spec = importlib.util.spec_from_file_location("fastformer_old_models", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastformer_old_models"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, type=Path, help="checkout holding the 'before' fastformer/models")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    old_models = load_old_models(args.old)
    torch.manual_seed(0)
    kw = dict(vocab_size=65, block_size=512, n_layer=6, n_head=6, n_embd=384)
    new = GPT(GPTConfig(**kw))
    old = old_models.GPT(old_models.GPTConfig(**kw))
    old.load_state_dict(new.state_dict())
    hf = _hf_sdpa(new)
    ids = torch.randint(0, 65, (4, 256))
    tgt = torch.randint(0, 65, (4, 256))
    for m in (new, old, hf):
        m.train()
    steps = {name: _train_step(m, torch.optim.AdamW(m.parameters(), lr=1e-4), ids, tgt, name == "hf", torch.float32)
             for name, m in (("new", new), ("old", old), ("hf", hf))}
    rows = []
    for a, b in (("new", "old"), ("new", "hf"), ("old", "hf")):
        r = paired_wall(steps[a], steps[b], "cpu", args.rounds)
        rows.append(("train B4 T256", a, b, r))
    old.load_state_dict(new.state_dict())
    hf = _hf_sdpa(new)
    for m in (new, old, hf):
        m.eval()
    prompt = torch.randint(0, 65, (1, 16))
    mask = torch.ones_like(prompt)
    n = args.new_tokens
    gens = {
        "new": lambda: new.generate(prompt, n, temperature=0.0),
        "old": lambda: old.generate(prompt, n, temperature=0.0),
        "hf": lambda: hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0),
    }
    same = torch.equal(gens["new"](), gens["old"]())
    for a, b in (("new", "old"), ("new", "hf"), ("old", "hf")):
        with torch.inference_mode():
            r = paired_wall(gens[a], gens[b], "cpu", args.rounds)
        rows.append((f"generate B1 prompt16 +{n}", a, b, r))
    print(f"threads {torch.get_num_threads()}; before/after generate identical tokens: {same}")
    for name, a, b, r in rows:
        print(f"{name:24s} {a:>3s} {r['a_s'] * 1e3:9.1f} ms  {b:>3s} {r['b_s'] * 1e3:9.1f} ms  "
              f"{a}/{b} = {r['ratio_a_over_b']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
