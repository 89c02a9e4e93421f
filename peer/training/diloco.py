"""DiLoCo state of one peer: the swarm's state θ_r, the inner optimizer, the outer step.

A round starts the live parameters at ``x_r = θ_r − c_r`` (:meth:`begin_round`), runs H inner AdamW
steps on the peer's pages, and takes the pseudo-gradient Δ_r = x_r − x_local (:meth:`pseudo_gradient`,
norm-bounded). ``c_r`` is the *carry*: zero in blocking rounds; in overlapped rounds the peer's own
Δ_{r−1}, whose average is still being all-reduced (an eager stand-in for it). The outer step
(:meth:`outer_step`) is Nesterov SGD on an averaged Δ: m ← μ·m + ḡ; θ ← θ − lr·(ḡ + μ·m). It runs on
CPU in fp32 from identical inputs, so every peer that averaged in the same group computes bit-identical
θ (checked by :meth:`state_hash`). Which ḡ is applied when is the trainer's business (README,
"How a round works").

With sparse Δs (:meth:`enable_topk`, ``--compression topk``) :meth:`pseudo_gradient` returns Δ̂ =
top-k(β·e + Δ) and keeps the rest in the error-feedback buffer e (:mod:`peer.training.sparse`). e is
part of the checkpoint (:meth:`state_dict`, ``error_feedback/<name>``) and is reset whenever the peer
adopts a state it did not compute itself (:meth:`load_state_tensors`: the residual belongs to the state
it left).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peer.config import TrainConfig
from peer.data.model import hash_tensors
from peer.errors import CheckpointError
from peer.training.sparse import ErrorFeedback, TopK


def make_inner_optimizer(name: str, params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``adamw`` (torch, CPU default) or ``adamw8bit`` (bitsandbytes, CUDA default: ¼ of the state memory)."""
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.inner_lr, weight_decay=cfg.inner_weight_decay, betas=(0.9, 0.95)
        )
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            params, lr=cfg.inner_lr, weight_decay=cfg.inner_weight_decay, betas=(0.9, 0.95)
        )
    raise ValueError(f"unknown optimizer {name!r}")


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


class DilocoState:
    """Parameters, snapshot and outer momentum of one peer (see module docstring)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, optimizer: str = "adamw"):
        self.model = model
        self.cfg = cfg
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.snapshot = [p.detach().to("cpu", torch.float32).clone() for p in self.params]
        self.momentum = [torch.zeros_like(s) for s in self.snapshot]
        self.inner = make_inner_optimizer(optimizer, self.params, cfg)
        self.local_steps = 0
        self.carry: list[torch.Tensor] | None = None
        """c_r: the part of the live start point that is not θ_r (None: x_r = θ_r)."""
        self.last_step: list[torch.Tensor] | None = None
        """The last outer step taken with ``keep_step`` (θ_r − θ_{r+1}); None otherwise."""
        self.last_delta_norm: float | None = None
        """Norm of the last :meth:`pseudo_gradient` before the ``max_delta_norm`` bound."""
        self.error_feedback: ErrorFeedback | None = None
        """Sparse Δs only (:meth:`enable_topk`): what was not sent yet."""

    def enable_topk(self, topk: TopK, decay: float = 1.0) -> None:
        """Send sparse Δ̂s with error feedback from now on (module docstring)."""
        self.error_feedback = ErrorFeedback([s.shape for s in self.snapshot], topk, decay)

    # -- the shared state -------------------------------------------------------------------------

    def state_hash(self) -> str:
        """Hash of θ_r (the snapshot): what every peer of the swarm must agree on."""
        return hash_tensors(zip(self.names, self.snapshot, strict=True))

    def momentum_hash(self) -> str:
        """Hash of the outer momentum m, announced next to :meth:`state_hash`: a peer that downloads θ_r
        also takes m, and a provider could otherwise serve the swarm's θ with any m (its next outer
        step would then throw the joiner off the swarm)."""
        return hash_tensors(zip(self.names, self.momentum, strict=True))

    def state_tensors(self) -> list[torch.Tensor]:
        """θ_r followed by the outer momentum: what a joining peer downloads."""
        return [*self.snapshot, *self.momentum]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"param/{n}": s for n, s in zip(self.names, self.snapshot, strict=True)}
        out.update({f"momentum/{n}": m for n, m in zip(self.names, self.momentum, strict=True)})
        if self.error_feedback is not None:
            ef = self.error_feedback.buffers
            out.update({f"error_feedback/{n}": e for n, e in zip(self.names, ef, strict=True)})
        return out

    def load_state_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        n = len(self.names)
        if len(tensors) != 2 * n:
            raise CheckpointError(f"state has {len(tensors)} tensors, this model needs {2 * n}")
        for i, (s, t) in enumerate(zip(self.snapshot + self.momentum, tensors, strict=True)):
            if s.shape != t.shape:
                name = self.names[i % n]
                raise CheckpointError(
                    f"state tensor {name} has shape {tuple(t.shape)}, model needs {tuple(s.shape)}"
                )
            s.copy_(t.to(torch.float32))
        if self.error_feedback is not None:
            self.error_feedback.reset()  # another state: our residual belongs to the one we left
        self._reset_params_to_snapshot()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            tensors = [state[f"param/{n}"] for n in self.names] + [state[f"momentum/{n}"] for n in self.names]
        except KeyError as e:
            raise CheckpointError(f"checkpoint lacks tensor {e.args[0]}") from None
        self.load_state_tensors(tensors)
        if self.error_feedback is not None:
            self._load_error_feedback(state)

    def _load_error_feedback(self, state: dict[str, torch.Tensor]) -> None:
        """e from a checkpoint (zeros when it has none: e.g. written by an 8-bit run of this peer)."""
        buffers = []
        for n, s in zip(self.names, self.snapshot, strict=True):
            e = state.get(f"error_feedback/{n}")
            if e is None:
                self.error_feedback.reset()
                return
            if e.shape != s.shape:
                raise CheckpointError(
                    f"checkpoint error_feedback/{n} has shape {tuple(e.shape)}, not {tuple(s.shape)}"
                )
            buffers.append(e.to(torch.float32).clone())
        self.error_feedback.buffers = buffers

    @torch.no_grad()
    def _reset_params_to_snapshot(self) -> None:
        for p, s in zip(self.params, self.snapshot, strict=True):
            p.copy_(s.to(p.device, p.dtype))

    # -- a round ----------------------------------------------------------------------------------

    @torch.no_grad()
    def begin_round(self, carry: Sequence[torch.Tensor] | None = None) -> None:
        """Set the live parameters to x_r = θ_r − carry (θ_r when ``carry`` is None) before inner training."""
        self.carry = None if carry is None else list(carry)
        self._reset_params_to_snapshot()
        if self.carry is not None:
            for p, c in zip(self.params, self.carry, strict=True):
                p.sub_(c.to(p.device, p.dtype))

    def inner_lr(self) -> float:
        warm = self.cfg.warmup_steps
        return self.cfg.inner_lr * min(1.0, (self.local_steps + 1) / warm) if warm else self.cfg.inner_lr

    def inner_step(self, loss: torch.Tensor) -> None:
        for group in self.inner.param_groups:
            group["lr"] = self.inner_lr()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.inner.step()
        self.inner.zero_grad(set_to_none=True)
        self.local_steps += 1

    @torch.no_grad()
    def pseudo_gradient(self) -> list[torch.Tensor]:
        """Δ = x_r − x_local = θ_r − carry − x_local (CPU fp32), its L2 norm clipped to ``max_delta_norm``;
        with sparse Δs the Δ̂ of :meth:`ErrorFeedback.step` (also bounded by ``max_delta_norm``).

        The norm before clipping is kept in :attr:`last_delta_norm` (the trainer reports it per round, so
        an operator can see whether the bound bites honest work)."""
        delta = [
            s - p.detach().to("cpu", torch.float32) for s, p in zip(self.snapshot, self.params, strict=True)
        ]
        if self.carry is not None:
            for d, c in zip(delta, self.carry, strict=True):
                d.sub_(c)
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta)).item()
        self.last_delta_norm = norm
        if norm > self.cfg.max_delta_norm:
            scale = self.cfg.max_delta_norm / norm
            delta = [d * scale for d in delta]
        if self.error_feedback is not None:
            delta = self.error_feedback.step(delta, max_norm=self.cfg.max_delta_norm)
        return delta

    @torch.no_grad()
    def outer_step(self, avg_delta: Sequence[torch.Tensor], keep_step: bool = False) -> None:
        """Nesterov SGD on an averaged pseudo-gradient; the result becomes the new θ (and live parameters).
        ``keep_step``: also keep the step taken, θ_before − θ_after up to rounding, as :attr:`last_step`
        (new tensors; the same bytes on every peer that took the same step)."""
        lr, mu = self.cfg.outer_settings(sparse=self.error_feedback is not None)
        step = []
        for s, m, g in zip(self.snapshot, self.momentum, avg_delta, strict=True):
            g = g.to(torch.float32)
            m.mul_(mu).add_(g)
            u = g.add(m, alpha=mu)
            s.sub_(u, alpha=lr)
            if keep_step:
                step.append(u.mul_(lr))
        self.last_step = step if keep_step else None
        self._reset_params_to_snapshot()

    @torch.no_grad()
    def discard_local(self) -> None:
        """Drop the local progress (the average failed): θ stays, the live parameters return to it."""
        self._reset_params_to_snapshot()
