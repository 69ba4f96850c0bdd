"""The models under PyTorch's training machinery: one DDP step and one FSDP2
(``fully_shard``) step on 2 gloo processes equal the single-process step on the
whole batch; autocast bf16; torch.compile; the examples' smoke modes."""

import copy
import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastformer.models import GPT, GPTConfig, ViT
from fastformer.ops.decode_attention import use_decode_backend

REPO = Path(__file__).resolve().parents[1]
CFG = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_embedding="rotary")


def _data():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 37, (4, 16), generator=g), torch.randint(0, 37, (4, 16), generator=g)


def _step(model, ids, tgt, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    _, loss = model(ids, tgt)
    loss.backward()
    opt.step()
    return loss.detach()


def _worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ids, tgt = _data()
    part = slice(rank * 2, rank * 2 + 2)
    torch.manual_seed(0)
    ddp_model = GPT(GPTConfig(**CFG))
    fsdp_model = copy.deepcopy(ddp_model)
    _step(DistributedDataParallel(ddp_model), ids[part], tgt[part])
    for block in fsdp_model.transformer.h:
        fully_shard(block)
    fully_shard(fsdp_model)
    _step(fsdp_model, ids[part], tgt[part])
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in fsdp_model.named_parameters()}
    if rank == 0:
        torch.save({"ddp": ddp_model.state_dict(), "fsdp": full}, os.path.join(out_dir, "params.pt"))
    # No teardown: under torch 2.11 the gloo group's destruction (destroy_process_group, or the
    # interpreter's finalization when it is skipped) aborted a rank now and then ("terminate
    # called without an active exception", SIGABRT), even after a barrier. Each rank instead
    # waits, through files rather than gloo, until every rank has finished its collectives, then
    # leaves with os._exit, which runs no destructor.
    dist.barrier()
    Path(out_dir, f"done{rank}").touch()
    deadline = time.monotonic() + 60
    while not all(Path(out_dir, f"done{r}").exists() for r in range(world)) and time.monotonic() < deadline:
        time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_and_fsdp2_step_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "params.pt")
    torch.manual_seed(0)
    single = GPT(GPTConfig(**CFG))
    _step(single, *_data())
    for name, p in single.named_parameters():
        torch.testing.assert_close(got["ddp"][name], p.detach(), atol=1e-6, rtol=1e-5, msg=f"DDP {name}")
        torch.testing.assert_close(got["fsdp"][name], p.detach(), atol=1e-6, rtol=1e-5, msg=f"FSDP2 {name}")


def test_autocast_bf16_training_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    ids, tgt = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(ids, tgt)
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    vit = ViT(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vit(torch.randn(2, 1, 8, 8)).float().sum().backward()
    assert torch.isfinite(vit.head.weight.grad).all()


def test_torch_compile_matches_eager():
    """aot_eager: traces the whole model (custom attention ops through their fake impls)
    without paying for Inductor's C++ compile in CI."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).eval()
    ids, _ = _data()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "examples"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "examples"))
    return module


@pytest.mark.parametrize("name, key", [("vit_digits", "test_accuracy"), ("translate_numbers", "exact_match_beam"),
                                       ("char_gpt", "val_loss"), ("forecast_chaos", "one_step_mse")])
def test_example_smoke(name, key):
    with use_decode_backend("torch"):  # the interpreted kernel is covered elsewhere
        result = _example(name).main(["--smoke", "--device", "cpu"])
    assert key in result and result[key] == result[key]  # present and not NaN


@pytest.mark.parametrize("model_mse, base_mse, words", [
    (1.84e-1, 1.33e-1, "1.38x worse than persistence"),   # once printed as "(1x better)"
    (8.0e-6, 2.65e-1, "3.31e+04x better than persistence"),
    (0.5, 0.5, "as good as persistence"),
])
def test_forecast_says_better_or_worse(model_mse, base_mse, words):
    assert _example("forecast_chaos").versus_persistence(model_mse, base_mse) == words


def test_every_example_training_loop_shows_progress():
    """Each example's training loop runs under the tqdm bar from _dist.Dist.progress."""
    for path in sorted((REPO / "examples").glob("[!_]*.py")):
        assert "d.progress(" in path.read_text(), f"{path.name}: training loop without a progress bar"
