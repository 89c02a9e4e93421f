"""One peer's model sharded over its local ranks with FSDP2, driven by rank 0.

A multi-rank peer (``peer join --nproc-per-node N``, :mod:`peer.training.ranks`) is one swarm member:
rank 0 runs the trainer, the DHT, the averager and the publisher exactly as a 1-rank peer does; ranks
1..N−1 hold a shard of the parameters, gradients and inner optimizer state and follow rank 0's commands.

What lives where (P = parameter count):

* every rank: its 1/N shard of the fp32 parameters (the master weights), of their gradients and of the
  inner AdamW state (``torch.distributed.fsdp.fully_shard`` per decoder layer and on the root, as in
  torchtitan); on GPUs the forward/backward run in bf16 (``MixedPrecisionPolicy``: bf16 params, fp32
  gradient reduction), one decoder layer unsharded at a time.
* rank 0 only, in host memory: θ_r, the outer momentum and the round's Δ (CPU fp32, 3 × 4P bytes: what
  a 1-rank peer holds too). The outer step runs there, on the same inputs and in the same order as on a
  1-rank peer, so θ's hash does not depend on N and validators receive the whole Δ unchanged.

Per round, over the node's own links (NCCL on GPUs, gloo on CPUs): θ_r − c_r is broadcast once from
rank 0 (4P bytes to each rank, one tensor at a time) and each rank keeps its shard; at the round's end
the live parameters are all-gathered once (one tensor at a time) and rank 0 keeps the full copy for
Δ = x_r − x_local. Per inner step each rank forwards and backwards its slice of the batch (FSDP
all-gathers the layers' parameters and reduce-scatters their gradients); the batch itself goes from
rank 0 to every rank (B·(seq_len+1) int64s). The swarm's all-reduce is unchanged: rank 0 sends and
receives the whole Δ like a 1-rank peer (the internet link is the bottleneck, not the node's).

Commands go from rank 0 to the others as a small float64 header tensor (never pickled objects):
``[op, lr, rows, cols]`` followed by the op's collectives, which every rank issues in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from peer.config import RunConfig, TrainConfig
from peer.training.diloco import DilocoState, make_inner_optimizer

log = logging.getLogger("gradswarm.fsdp")

OP_STOP, OP_SET, OP_STEP, OP_EVAL, OP_GATHER = 0, 1, 2, 3, 4
_HEADER = 4


def shard_model(model: torch.nn.Module, mesh, *, bf16: bool) -> None:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head), in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp is not None else {})}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def local_shard_bytes(module: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> dict:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards only)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    out = {"params": 0, "grads": 0, "optimizer": 0}
    for p in module.parameters() if module is not None else []:
        out["params"] += local(p).numel() * p.element_size()
        if p.grad is not None:
            out["grads"] += local(p.grad).numel() * p.grad.element_size()
    for state in optimizer.state.values() if optimizer is not None else []:
        for v in state.values():
            if torch.is_tensor(v):
                out["optimizer"] += local(v).numel() * v.element_size()
    return out


class LocalShardOptimizer:
    """An optimizer that only takes plain tensors (bitsandbytes' 8-bit AdamW), run on this rank's shards.

    Each sharded parameter's local tensor is wrapped as a plain parameter sharing its storage; before a
    step the local part of its gradient is handed over. AdamW is elementwise, so this is the same update
    as on the full tensor, except that 8-bit blockwise quantisation blocks end at shard boundaries."""

    def __init__(self, name: str, params: list[torch.nn.Parameter], train: TrainConfig):
        self.sharded = params
        self.local = [torch.nn.Parameter(_local(p.detach())) for p in params]
        self.inner = make_inner_optimizer(name, self.local, train)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def step(self) -> None:
        for p, q in zip(self.sharded, self.local, strict=True):
            q.grad = None if p.grad is None else _local(p.grad)
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, q in zip(self.sharded, self.local, strict=True):
            p.grad = q.grad = None

    def register_step_pre_hook(self, hook):
        return self.inner.register_step_pre_hook(hook)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedModel:
    """The model's shard on this rank and the collectives of each command (rank 0 leads, others follow)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        optimizer: str,
        train: TrainConfig,
        rank: int,
        world: int,
        device: torch.device,
        mesh,
    ):
        self.model = model
        self.rank = rank
        self.world = world
        self.device = torch.device(device)
        self.mesh = mesh
        self.train = train
        self.params = list(model.parameters())
        if optimizer == "adamw8bit":  # bitsandbytes' kernels refuse DTensors: run it on the local shards
            self.optimizer = LocalShardOptimizer(optimizer, self.params, train)
        else:
            self.optimizer = make_inner_optimizer(optimizer, self.params, train)

    # -- leader side: a header, then the op's collectives ------------------------------------------

    def _command(self, op: int, lr: float = 0.0, rows: int = 0, cols: int = 0) -> None:
        assert self.rank == 0, "only rank 0 issues commands"
        header = torch.tensor([op, lr, rows, cols], dtype=torch.float64)
        dist.broadcast(header, src=0)

    def set_full(self, tensors: Sequence[torch.Tensor]) -> None:
        """Every rank's shard of the parameters ← the full tensors rank 0 holds (CPU fp32)."""
        self._command(OP_SET)
        self._set_full(tensors)

    def gather_full(self) -> list[torch.Tensor]:
        """The full parameters, gathered to rank 0 (CPU fp32)."""
        self._command(OP_GATHER)
        return self._gather_full()

    def step(self, batch: torch.Tensor, lr: float) -> float:
        """One inner step on ``batch`` split row-wise over the ranks; returns the whole batch's mean loss."""
        batch = batch.to(torch.int64)
        self._command(OP_STEP, lr, *batch.shape)
        return self._step(batch, lr)

    def eval_loss(self, batch: torch.Tensor) -> float:
        batch = batch.to(torch.int64)
        self._command(OP_EVAL, 0.0, *batch.shape)
        return self._eval(batch)

    def stop(self) -> None:
        self._command(OP_STOP)

    # -- follower side --------------------------------------------------------------------------------

    def serve(self) -> None:
        """Ranks 1..N−1: run rank 0's commands until it says stop (or the process group breaks)."""
        while True:
            header = torch.zeros(_HEADER, dtype=torch.float64)
            dist.broadcast(header, src=0)
            op, lr, rows, cols = int(header[0]), float(header[1]), int(header[2]), int(header[3])
            if op == OP_STOP:
                return
            if op == OP_SET:
                self._set_full(None)
            elif op == OP_GATHER:
                self._gather_full()
            elif op == OP_STEP:
                self._step(torch.empty(rows, cols, dtype=torch.int64), lr)
            elif op == OP_EVAL:
                self._eval(torch.empty(rows, cols, dtype=torch.int64))
            else:
                raise RuntimeError(f"rank {self.rank}: unknown command {op} from rank 0")

    # -- the collectives, identical on every rank ------------------------------------------------

    @torch.no_grad()
    def _set_full(self, tensors: Sequence[torch.Tensor] | None) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for i, p in enumerate(self.params):
            if self.rank == 0:
                buf = tensors[i].to(self.device, torch.float32).contiguous()
            else:
                buf = torch.empty(p.shape, dtype=torch.float32, device=self.device)
            dist.broadcast(buf, src=0)
            if isinstance(p, DTensor):
                mine = distribute_tensor(buf, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(mine)
            else:
                p.copy_(buf)

    @torch.no_grad()
    def _gather_full(self) -> list[torch.Tensor]:
        out = []
        for p in self.params:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if self.rank == 0:
                out.append(full.detach().to("cpu", torch.float32, copy=True))
            del full
        return out

    def _my_rows(self, batch: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """This rank's slice of the batch (rank 0 sends it to all), its loss weight and the batch's tokens."""
        batch = batch.contiguous()
        dist.broadcast(batch, src=0)
        tokens = batch[:, 1:].numel()
        mine = torch.tensor_split(batch, self.world, dim=0)[self.rank]
        if len(mine) == 0:  # fewer rows than ranks: a zero-weighted row keeps FSDP's collectives in step
            return batch[:1].to(self.device), 0.0, tokens
        return mine.to(self.device), 1.0, tokens

    def _summed_loss(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=rows[:, :-1]).logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1), reduction="sum"
        )

    def _mean_over_ranks(self, summed: torch.Tensor, weight: float, tokens: int) -> float:
        total = (summed.detach() * weight).to("cpu", torch.float64).reshape(1)
        dist.all_reduce(total)
        return float(total) / tokens

    def _step(self, batch: torch.Tensor, lr: float) -> float:
        rows, weight, tokens = self._my_rows(batch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        summed = self._summed_loss(rows)
        # FSDP averages gradients over the ranks; × world / tokens makes that the whole batch's mean
        (summed * (weight * self.world / tokens)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._mean_over_ranks(summed, weight, tokens)

    @torch.no_grad()
    def _eval(self, batch: torch.Tensor) -> float:
        rows, weight, tokens = self._my_rows(batch)
        was = self.model.training
        self.model.eval()
        try:
            return self._mean_over_ranks(self._summed_loss(rows), weight, tokens)
        finally:
            self.model.train(was)


def build_follower(
    run: RunConfig, *, optimizer: str, rank: int, world: int, device: torch.device, mesh
) -> ShardedModel:
    """Ranks 1..N−1: the model built on the meta device (no full copy), sharded, then materialised."""
    from transformers import LlamaForCausalLM

    from peer.data.model import llama_config

    with torch.device("meta"):  # built in place (not moved): tied embeddings stay tied, as on rank 0
        model = LlamaForCausalLM(llama_config(run))
    shard_model(model, mesh, bf16=torch.device(device).type == "cuda")
    model.to_empty(device=device)
    _broadcast_buffers(model, rank)
    return ShardedModel(
        model, optimizer=optimizer, train=run.train, rank=rank, world=world, device=device, mesh=mesh
    )


@torch.no_grad()
def _broadcast_buffers(model: torch.nn.Module, rank: int) -> None:
    """Buffers (rotary frequencies) are not parameters: rank 0's values, computed at init, go to all."""
    for _, b in model.named_buffers():
        dist.broadcast(b, src=0)


class ShardedDilocoState(DilocoState):
    """Rank 0's :class:`DilocoState` whose live parameters are FSDP2 shards spread over the peer's ranks.

    θ, momentum, Δ and the outer step are the parent's (CPU fp32, full tensors, rank 0 only); what
    touches the live parameters goes through :class:`ShardedModel`'s commands instead."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, optimizer: str, *, ranks):
        # the parent takes θ from the full, freshly built model; its optimizer is replaced below
        super().__init__(model, cfg, "adamw")
        shard_model(model, ranks.mesh, bf16=ranks.device.type == "cuda")
        _broadcast_buffers(model, 0)
        self.sharded = ShardedModel(
            model,
            optimizer=optimizer,
            train=cfg,
            rank=0,
            world=ranks.world,
            device=ranks.device,
            mesh=ranks.mesh,
        )
        self.params = self.sharded.params
        self.inner = self.sharded.optimizer
        self._reset_params_to_snapshot()

    @torch.no_grad()
    def _reset_params_to_snapshot(self) -> None:
        self.sharded.set_full(self.snapshot)

    @torch.no_grad()
    def begin_round(self, carry: Sequence[torch.Tensor] | None = None) -> None:
        self.carry = None if carry is None else list(carry)
        start = (
            self.snapshot
            if self.carry is None
            else [s - c for s, c in zip(self.snapshot, self.carry, strict=True)]
        )
        self.sharded.set_full(start)

    def inner_step(self, loss: torch.Tensor) -> None:
        raise RuntimeError("a sharded peer steps with train_step(batch): every rank must take part")

    def train_step(self, batch: torch.Tensor) -> float:
        value = self.sharded.step(batch, self.inner_lr())
        self.local_steps += 1
        return value

    def eval_loss(self, batch: torch.Tensor) -> float:
        return self.sharded.eval_loss(batch)

    @torch.no_grad()
    def pseudo_gradient(self) -> list[torch.Tensor]:
        with self._params_are(self.sharded.gather_full()):
            return super().pseudo_gradient()

    @contextmanager
    def _params_are(self, tensors: list[torch.Tensor]):
        """The parent's Δ reads ``self.params``: let it read the gathered full copies for the call."""
        sharded, self.params = self.params, tensors
        try:
            yield
        finally:
            self.params = sharded
