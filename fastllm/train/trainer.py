"""The training loop: ``train(config) -> final metrics``, on one CPU/GPU or many GPUs through torchrun.

Read top to bottom, ``train`` does:

1. processes and devices (one process, or DDP / FSDP2 under torchrun), the data (tokenised once into
   ``<out>/data`` unless ``data.source`` is already a prepared directory), the batch geometry;
2. the model (``fastllm.models``), activation checkpointing, ``torch.compile``, DDP or ``fully_shard``,
   the optimizer and the learning-rate schedule; the latest checkpoint in ``run.out`` when resuming;
3. the loop: one optimizer step per global batch of ``data.batch_size`` sequences, split into micro
   batches of ``data.micro_batch_size`` sequences per process (gradient accumulation over the rest);
   bf16 autocast on GPU; the loss is the mean over every target token of the global batch, so any
   split over processes and micro batches gives the same gradient; gradient clipping; logging,
   evaluation and checkpoints at their intervals and at the end; the loss-curve plot.

NaN / inf policy: a step whose loss or gradient norm is not finite is skipped (no parameter update; its
batch is consumed and the schedule moves on) and logged. After ``run.max_nan_skips`` skipped steps in
the run, the next one stops training: no checkpoint is written from then on, so the last good
checkpoint stays the latest, and ``train`` returns with ``status = "nan"``.

Resume: with ``run.resume`` (the default) a run directory that holds checkpoints continues from the
latest one: weights, optimizer and schedule state, each process' data-loader position and RNG states
are restored, so the loss trajectory is exactly the uninterrupted one (same world size required).
"""

from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from fastllm.data import IGNORE_INDEX, PackedLoader, load_tokenizer, prepare_dataset
from fastllm.data.prepare import read_meta, unigram_entropy
from fastllm.models import build_model, config_from_dict
from fastllm.optim.schedules import build_optimizer, build_scheduler
from fastllm.train import checkpoint as ckpt
from fastllm.train import distributed
from fastllm.train.config import ConfigError, TrainConfig
from fastllm.train.metrics import MetricsLogger, peak_flops, plot_losses


def train(config: TrainConfig) -> dict:
    """Trains as ``config`` says; returns the final metrics (also the last lines of metrics.jsonl)."""
    config.validate()
    env = distributed.setup(config.run.device)
    try:
        return _train(config, env)
    finally:
        env.close()


def _train(cfg: TrainConfig, env: distributed.Env) -> dict:
    out = Path(cfg.run.out)
    say = tqdm.write if env.main else (lambda *_: None)
    if not cfg.run.resume and (found := ckpt.list_checkpoints(out)):
        # A fresh run here would mix with the old one: rotation (by step) would delete the new checkpoints,
        # and a later resume would continue whichever run has the highest step.
        raise ConfigError(f"run.resume=false but run.out={str(out)!r} already holds checkpoints (latest "
                          f"{found[-1].name}); resume it (run.resume=true) or give a fresh run.out")

    # --- data and batch geometry ---
    data_dir = prepare_data(cfg, env)
    tokenizer = load_tokenizer(data_dir)
    micro, accum = batch_geometry(cfg, env.world)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

    # --- model, parallelism, optimizer, schedule ---
    model_config = build_model_config(cfg, tokenizer.vocab_size)
    torch.manual_seed(cfg.run.seed)
    model = build_model(model_config).to(env.device)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    if cfg.run.activation_checkpointing:
        for block in transformer_blocks(model):
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    if cfg.run.compile and not (env.distributed and cfg.run.parallel == "fsdp"):
        model.compile()
    if env.distributed and cfg.run.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            if cfg.run.compile:
                block.compile()
            fully_shard(block)
        fully_shard(model)
        sync_context = _fsdp_sync_context
    elif env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None, broadcast_buffers=False)
        sync_context = _ddp_sync_context
    else:
        sync_context = _no_sync_context
    raw_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    optimizer = build_optimizer(
        cfg.optim.name, raw_model, lr=cfg.optim.lr, betas=cfg.optim.betas, alpha=cfg.optim.alpha,
        t_alpha=cfg.optim.t_alpha or cfg.run.steps, t_beta3=cfg.optim.t_beta3 or cfg.run.steps,
        eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.schedule.name, total_steps=cfg.run.steps,
                                warmup_steps=cfg.schedule.warmup_steps, decay_fraction=cfg.schedule.decay_fraction,
                                decay_shape=cfg.schedule.decay_shape, min_ratio=cfg.schedule.min_lr_ratio)
    use_bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and env.device.type == "cuda")
    autocast = partial(torch.autocast, env.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    loader = PackedLoader(data_dir, split="train", batch_size=micro, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                          rank=env.rank, world_size=env.world, goldfish_k=cfg.data.goldfish_k or None,
                          goldfish_h=cfg.data.goldfish_h if cfg.data.goldfish_k else None,
                          goldfish_seed=cfg.data.goldfish_seed)

    # --- resume ---
    step, nan_skips = 0, 0
    latest = ckpt.list_checkpoints(out)[-1:] if cfg.run.resume else []
    if latest:
        step, nan_skips = restore(latest[0], raw_model, optimizer, scheduler, loader, env)
        say(f"resumed from {latest[0]} at step {step}")
    logger = MetricsLogger(out, enabled=env.main, resume_step=step, tensorboard=cfg.run.tensorboard,
                           wandb=cfg.run.wandb, wandb_project=cfg.run.wandb_project, config=cfg.to_dict())
    for note in logger.notes:
        say(note)
    peak = peak_flops(env.device, cfg.run.peak_tflops)
    say(f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(exclude_embeddings=True) / 1e6:.2f}M "
        f"without embeddings); {env.world} process(es) on {env.device.type}"
        f"{' (' + cfg.run.parallel + ')' if env.distributed else ''}; {tokens_per_step} tokens per step = "
        f"{cfg.data.batch_size} sequences x {cfg.data.seq_len} (micro batch {micro}, accumulation {accum}); "
        f"{'bf16 autocast' if use_bf16 else 'fp32'}")

    # --- the loop ---
    last_eval = last_ckpt = step
    status, val = "completed", None
    progress = tqdm(total=cfg.run.steps, initial=step, disable=not (env.main and cfg.run.progress),
                    unit="step", dynamic_ncols=True)
    interval_start, interval_steps, interval_loss = time.perf_counter(), 0, 0.0
    run_start = time.perf_counter()
    model.train()
    while step < cfg.run.steps:
        batches = [next(loader) for _ in range(accum)]
        # Normalise by the global number of target tokens, so the gradient is the global mean.
        # Counted on the host, where the batches are: only the all-reduce of a distributed run touches the device.
        n_targets = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)
        if env.distributed:
            n_targets = env.sum(n_targets.to(env.device)).item()
        n_targets = int(n_targets)
        loss_sum = torch.zeros((), device=env.device)
        for i, batch in enumerate(batches):
            batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
            with sync_context(model, last=i == accum - 1):
                with autocast():  # the summed loss, by the fused linear cross-entropy
                    loss = model(batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"])
                # DDP and FSDP average gradients over processes: scale by the world size to sum them.
                (loss * (env.world / max(n_targets, 1))).backward()
            loss_sum += loss.detach()
        train_loss = env.sum(loss_sum).item() / max(n_targets, 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip or math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        finite = math.isfinite(train_loss) and math.isfinite(grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        progress.update(1)
        if not finite:
            nan_skips += 1
            logger.log(step, skipped=True, skipped_loss=str(train_loss), skipped_grad_norm=str(grad_norm))
            say(f"step {step}: non-finite loss {train_loss} / gradient norm {grad_norm}: step skipped "
                f"({nan_skips} of at most {cfg.run.max_nan_skips})")
            if nan_skips > cfg.run.max_nan_skips:
                status = "nan"
                say(f"stopping: more than run.max_nan_skips={cfg.run.max_nan_skips} non-finite steps; "
                    f"the last good checkpoint is {_latest_name(out)}")
                break
            continue
        interval_steps += 1
        interval_loss += train_loss
        if step % cfg.run.log_interval == 0 or step == cfg.run.steps:
            elapsed = time.perf_counter() - interval_start
            tokens_per_s = interval_steps * tokens_per_step / elapsed
            mfu = flops_per_token * tokens_per_s / (peak * env.world) if peak else None
            logger.log(step, loss=train_loss, lr=lr, grad_norm=grad_norm,
                       tokens=step * tokens_per_step, tokens_per_s=tokens_per_s, mfu=mfu,
                       elapsed_s=time.perf_counter() - run_start)
            progress.set_postfix(loss=f"{interval_loss / interval_steps:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                 refresh=False)
            interval_start, interval_steps, interval_loss = time.perf_counter(), 0, 0.0
        paused = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
        if (cfg.run.eval_interval and step % cfg.run.eval_interval == 0) or step == cfg.run.steps:
            val = evaluate(model, data_dir, cfg, env, micro, accum, autocast)
            logger.log(step, val_loss=val, val_ppl=math.exp(min(val, 700)))
            say(f"step {step}: validation loss {val:.4f}, perplexity {math.exp(min(val, 700)):.2f}")
            last_eval = step
        if cfg.run.ckpt_interval and step % cfg.run.ckpt_interval == 0 or step == cfg.run.steps:
            save(out, step, nan_skips, raw_model, model_config, cfg, optimizer, scheduler, loader, tokenizer, env)
            last_ckpt = step
        interval_start += time.perf_counter() - paused
    progress.close()

    # --- the end: final evaluation and checkpoint (when the loop did not just do them), plot ---
    if status == "completed":
        if last_eval != step or val is None:
            val = evaluate(model, data_dir, cfg, env, micro, accum, autocast)
            logger.log(step, val_loss=val, val_ppl=math.exp(min(val, 700)))
        if last_ckpt != step or not ckpt.list_checkpoints(out):
            save(out, step, nan_skips, raw_model, model_config, cfg, optimizer, scheduler, loader, tokenizer, env)
    logger.close()
    result = {"status": status, "step": step, "val_loss": val,
              "val_ppl": math.exp(min(val, 700)) if val is not None else None,
              "unigram_entropy": unigram_entropy(data_dir, "val"), "nan_skips": nan_skips,
              "train_seconds": time.perf_counter() - run_start, "checkpoint": _latest_name(out)}
    if env.main and cfg.run.plot:
        say(plot_losses(out))
    return result


# --- pieces of setup ---


def prepare_data(cfg: TrainConfig, env: distributed.Env) -> Path:
    """A prepared dataset directory: ``data.source`` itself when it is one, else it tokenised (by rank 0)."""
    source = Path(cfg.data.source)
    if (source / "meta.json").is_file():
        return source
    data_dir = Path(cfg.data.prepared_dir or Path(cfg.run.out) / "data")
    if env.main:
        prepare_dataset(cfg.data.source, data_dir, cfg.data.tokenizer, val_fraction=cfg.data.val_fraction,
                        seed=cfg.data.seed)
    env.barrier()
    read_meta(data_dir)
    return data_dir


def batch_geometry(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) for the global ``data.batch_size``."""
    micro = cfg.data.micro_batch_size or cfg.data.batch_size // world
    if micro < 1 or cfg.data.batch_size % (micro * world):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be a multiple of data.micro_batch_size "
                          f"({micro}) x processes ({world})")
    return micro, cfg.data.batch_size // (micro * world)


def build_model_config(cfg: TrainConfig, tokenizer_vocab: int):
    """The model config; vocabulary and context default to the tokenizer's and ``data.seq_len``."""
    model = {"vocab_size": tokenizer_vocab, "max_seq_len": cfg.data.seq_len, **cfg.model}
    if model["vocab_size"] < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={model['vocab_size']} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab})")
    try:
        return config_from_dict(model)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"model: {e}") from None


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's repeated blocks (unit of activation checkpointing, compilation and sharding)."""
    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList of blocks to checkpoint or shard")
    return blocks


def _no_sync_context(model, last: bool):
    return contextlib.nullcontext()


def _ddp_sync_context(model, last: bool):
    # Gradients are all-reduced on the last micro batch only.
    return contextlib.nullcontext() if last else model.no_sync()


def _fsdp_sync_context(model, last: bool):
    model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


# --- evaluation ---


@torch.no_grad()
def evaluate(model, data_dir: Path, cfg: TrainConfig, env: distributed.Env, micro: int, accum: int,
             autocast) -> float:
    """Mean loss over the first ``run.eval_batches`` global batches of the validation split (fixed order)."""
    loader = PackedLoader(data_dir, split="val", batch_size=micro, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                          rank=env.rank, world_size=env.world)
    model.eval()
    totals = torch.zeros(2, device=env.device, dtype=torch.float64)
    for _ in range(cfg.run.eval_batches * accum):
        batch = {k: v.to(env.device) for k, v in next(loader).items()}
        with autocast():
            totals[0] += model(batch["input_ids"], doc_ids=batch["doc_ids"], labels=batch["labels"]).double()
        totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
    model.train()
    env.sum(totals)
    return (totals[0] / totals[1].clamp_min(1)).item()


# --- checkpoints ---


def _state_dict_options(model) -> StateDictOptions:
    # Sharded (FSDP2) states are gathered into full tensors on rank 0's CPU; others are already whole.
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)


def save(out: Path, step: int, nan_skips: int, model, model_config, cfg: TrainConfig, optimizer, scheduler,
         loader, tokenizer, env: distributed.Env) -> None:
    """Every rank takes part (sharded states are gathered); rank 0 writes."""
    options = _state_dict_options(model)
    weights = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    loaders = env.gather_objects(loader.state_dict())
    rngs = env.gather_objects(ckpt.rng_state())
    if env.main:
        state = {"step": step, "nan_skips": nan_skips, "world_size": env.world, "optimizer": optim_state,
                 "scheduler": scheduler.state_dict(), "loader": loaders, "rng": rngs}
        ckpt.save_checkpoint(out, step, weights={k: v.cpu() for k, v in weights.items()},
                             model_config=model_config.to_dict(), train_config=cfg.to_dict(), state=state,
                             tokenizer=tokenizer, keep=cfg.run.keep_checkpoints)
    env.barrier()


def restore(path: Path, model, optimizer, scheduler, loader, env: distributed.Env) -> tuple[int, int]:
    """Loads a checkpoint written by ``save`` into this run; returns (step, NaN skips so far)."""
    state = ckpt.load_state(path)
    if state["world_size"] != env.world:
        raise RuntimeError(f"{path} was written by {state['world_size']} processes; resuming it exactly needs "
                           f"the same number (this run has {env.world}); or start a fresh run.out")
    weights = ckpt.load_weights(path)
    ckpt.fill_missing_aliases(model, weights)
    options = _state_dict_options(model)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"][env.rank])
    ckpt.set_rng_state(state["rng"][env.rank])
    return state["step"], state["nan_skips"]


def _latest_name(out: Path) -> str | None:
    found = ckpt.list_checkpoints(out)
    return str(found[-1]) if found else None

