"""Typed, validated configs, one dataclass per concern, loaded from ``model_configs/*.yaml``.

A model config file has one section per concern::

    model: {hidden_size: 64, ...}        # ModelConfig: the Llama architecture
    data: {vocab_size: 2048, ...}        # DataConfig: tokenizer and pages
    train: {inner_lr: 1e-3, ...}         # TrainConfig: inner/outer optimisation and rounds

Every field has a docstring saying what it does and how to tune it. Unknown keys are errors, so a typo
in a YAML file fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from peer.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style decoder, built locally as HF ``LlamaForCausalLM`` (no hub download)."""

    hidden_size: int
    """Width of the residual stream. Memory and compute grow ~quadratically with it."""
    intermediate_size: int
    """Width of the MLP (SwiGLU); usually ~2.7x hidden_size."""
    num_hidden_layers: int
    """Number of transformer blocks."""
    num_attention_heads: int
    """Attention heads; hidden_size must be divisible by it."""
    num_key_value_heads: int | None = None
    """Grouped-query attention heads (None = same as num_attention_heads)."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary embeddings are set up for; must be >= data.seq_len."""
    rms_norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    tie_word_embeddings: bool = False
    """Share input and output embeddings (saves vocab_size*hidden_size parameters)."""
    initializer_range: float = 0.02
    """Std of the normal init. The init is seeded, so every peer builds the same starting weights."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ConfigError("model.num_attention_heads must be a multiple of model.num_key_value_heads")


@dataclass(kw_only=True)
class DataConfig:
    """Tokenizer and page layout. Pages are fixed-size token blocks addressed by index."""

    vocab_size: int
    """Byte-level BPE vocabulary size trained on the corpus; also the model's vocab size."""
    seq_len: int
    """Tokens per training sample (the model sees seq_len tokens, predicts seq_len)."""
    samples_per_page: int = 8
    """Samples in one page; a page holds samples_per_page * (seq_len + 1) tokens."""
    heldout_permille: int = 50
    """Pages per thousand kept out of training for evaluation (chosen by a hash of the page id)."""
    pages_per_round: int = 16
    """Pages assigned to each hotkey per round. Raise it if peers run out of data within a round."""
    corpus: str = "shakespeare"
    """Offline corpus name (``shakespeare``) or ``hf:<dataset>[:<config>]`` for HF datasets streaming."""
    max_corpus_chars: int | None = None
    """Use only the first N characters of the corpus (tests and quick demos). None = all of it."""

    def __post_init__(self) -> None:
        if not 256 < self.vocab_size <= 65535:
            raise ConfigError(f"data.vocab_size must be in (256, 65535], got {self.vocab_size}")
        if self.seq_len < 8:
            raise ConfigError(f"data.seq_len must be >= 8, got {self.seq_len}")
        if self.samples_per_page < 1:
            raise ConfigError("data.samples_per_page must be >= 1")
        if not 0 < self.heldout_permille < 500:
            raise ConfigError("data.heldout_permille must be in (0, 500)")
        if self.pages_per_round < 1:
            raise ConfigError("data.pages_per_round must be >= 1")

    @property
    def page_tokens(self) -> int:
        return self.samples_per_page * (self.seq_len + 1)


@dataclass(kw_only=True)
class TrainConfig:
    """Inner (local) and outer (swarm) optimisation, DiLoCo-style."""

    batch_size: int = 8
    """Samples per inner step. Lower it if you run out of memory; raise it for throughput."""
    inner_lr: float = 1e-3
    """AdamW learning rate of the local steps. If local loss spikes or goes NaN, lower it."""
    inner_weight_decay: float = 0.1
    """AdamW weight decay of the local steps."""
    warmup_steps: int = 20
    """Linear warm-up of the inner learning rate, counted in local steps since the peer started."""
    grad_clip: float = 1.0
    """Clip the global grad norm of each inner step to this value."""
    outer_lr: float = 0.7
    """Outer Nesterov SGD learning rate applied to the averaged pseudo-gradient (DiLoCo uses 0.7, at
    H = 500 and from a pre-trained start). Symptom of too much outer step (lr and momentum together):
    held-out loss rises for a few rounds after the first averaged ones. On ``debug`` from scratch with
    H ≈ 50–100, ``outer_lr: 1.0`` with ``outer_momentum: 0.0`` (the plain average) stayed closest to
    synchronous data parallelism, and kept overlapped rounds stable (benchmarks/RESULTS.md, "Loss
    parity"; ``benchmarks/parity.py sim`` compares settings in minutes)."""
    outer_momentum: float = 0.9
    """Outer Nesterov momentum (DiLoCo uses 0.9). See ``outer_lr`` for when to lower it."""
    round_seconds: float = 10.0
    """Wall-clock length of a round (local clock; on a chain, round_blocks * block time).
    Longer rounds mean more inner steps per averaging (less communication, more drift)."""
    max_inner_steps: int = 500
    """Upper bound on inner steps per round (H). A fast peer stops at H and waits for the boundary."""
    averaging_reserve_seconds: float = 2.0
    """Seconds before the round boundary at which inner training stops and averaging starts.
    Raise it if peers often miss the all-reduce ("averaging failed: timeout")."""
    averaging_timeout: float = 30.0
    """Seconds a peer waits for the all-reduce to finish before giving up on the round."""
    max_delta_norm: float = 10.0
    """Upper bound on the L2 norm of one round's pseudo-gradient Δ. A peer scales its own Δ down to it;
    receivers in the all-reduce clip incoming parts to it and zero any averaged part longer than it.
    Two forces set it. Too low, it clips honest work: more inner steps stop adding anything to the swarm
    (and validators cannot tell 40 steps of work from 80); symptom: ``delta_clipped: true`` in most
    lines of ``rounds.jsonl``. Too high, a lying part owner can return its slice of the average up to
    this norm (many times an honest slice); symptom: held-out loss jumps up in rounds with a bad peer in
    the group. Δ grows with inner steps H, ``inner_lr`` and √(parameters): set it 1.5–3× the
    ``delta_norm`` honest peers report at the round length you run."""
    seed: int = 0
    """Seed of the model's initial weights; every peer in a swarm must use the same."""
    rounds: str = "blocking"
    """``blocking`` (default): training stops ``averaging_reserve_seconds`` before the round's end and
    waits for the all-reduce (θ_{r+1} = OuterStep(θ_r, ḡ_r)). ``overlapped``: the all-reduce of round r's
    Δ runs in the background while round r+1 trains, and its outer step is applied one round late
    (θ_{r+1} = OuterStep(θ_r, ḡ_{r−1}); the peer's own Δ_r stands in for ḡ_r meanwhile): no training
    time is lost to communication (``small``, 2 peers at 20 Mbit/s: utilisation 0.917 against 0.691
    blocking, worst of 3). Its outer step uses ``overlapped_outer_lr`` / ``overlapped_outer_momentum``.
    Validators score overlapped Δs to first order on θ_{r+1} (``validator.evaluation``, README "How a
    round works"): 48 of 48 honest peer-rounds paid in rounds 9–28 of an overlapped ``make demo``. Not
    the default: those rewards are not proportional to work (worst of 3 runs: 4× compute earned 1.57×,
    five hotkeys splitting one peer's steps 5.30× it; benchmarks/RESULTS.md, "Overlapped rounds:
    validators pay the first-order gain"), so a paid subnet would invite splitting hotkeys. Symptom
    that it would pay off: ``averaging_seconds`` in ``rounds.jsonl`` a large share of a round. Every
    peer of a swarm (and its validators' model config) must use the same."""
    overlapped_start: str = "own"
    """``rounds: overlapped`` only: where round r+1's inner steps start while ḡ_r is still in flight.
    ``own`` (default): x_{r+1} = θ_{r+1} − Δ_r, the peer's own Δ standing in for ḡ_r ("Eager updates",
    Kale et al. 2025, with weight 1): the best loss (4 peers, 24 rounds, in simulation: 1.026 × data
    parallelism), but each Δ then repairs its peer's own deviation from the average, which is what
    keeps overlapped rewards from being proportional. ``shared``: x_{r+1} = θ_{r+1} + (θ_{r+1} − θ_r),
    the swarm's last outer step taken once more: one start point for every peer, computable from public
    states, with no peer-specific repair in any Δ: #18's reward figures then look like blocking rounds'
    (worst of 3: 4× compute 3.18× against 1.57× with ``own``, five hotkeys 0.41× against 5.30×, equal
    peers 1.35 against 2.40). It needs a smaller ``overlapped_outer_lr`` (4 peers in simulation: 1.26 ×
    dp at 1.0, oscillating; 1.117 at 0.7; 1.041 at 0.5, the best; 1.058 at 0.3; the peer warns above 0.5; benchmarks/RESULTS.md,
    "Overlapped rounds: a shared start point"). Every peer of a swarm must use the same."""
    overlapped_outer_lr: float | None = 1.0
    """``rounds: overlapped`` only: the outer learning rate used instead of ``outer_lr`` (None:
    ``outer_lr``). See ``overlapped_outer_momentum``."""
    overlapped_outer_momentum: float | None = 0.0
    """``rounds: overlapped`` only: the outer Nesterov momentum used instead of ``outer_momentum`` (None:
    ``outer_momentum``). A one-round-late outer step with momentum 0.9 feeds back a round late and
    overshoots: on ``debug`` with 2 honest peers, every round averaged and bit-identical, held-out loss
    went 6.2 → 8.6 after the first averaged rounds (``benchmarks/parity.py``; the in-process sim shows
    the same bump, 6.4 → 7.7), which is what the suite's sigkill/late-join swarm had shown. With the
    plain average (lr 1.0, momentum 0) the overlapped 2-peer swarm stayed within 1.018 of synchronous
    data parallelism on the same samples (3 runs). Symptom of too much: held-out loss rises for a few
    rounds after the first averaged ones → lower either; topk's own settings take precedence."""

    topk_density: float = 0.015625
    """``--compression topk`` only: fraction of each chunk's values a peer sends per round (k =
    density × ``topk_chunk``, at least 1). Bytes per round scale with it (≈ 3 bytes per kept value — a uint16
    position and an int8 code — plus a 4-byte scale per chunk, on the wire and in the published Δ); what is not sent waits in the peer's error-feedback buffer. Default
    1/64 (64 of 4096), chosen by ``benchmarks/sparse.py`` (README "Sparse Δs"): lower it if uplinks are
    the bottleneck, raise it if held-out loss falls behind 8-bit rounds. Validators check published
    sparse Δs against it: every peer and validator of a swarm must use the same."""
    topk_chunk: int = 4096
    """``--compression topk`` only: values per top-k chunk of a flattened tensor (≤ 32768: positions are
    int16). Smaller chunks spread the kept values more evenly over a tensor."""
    topk_ef_decay: float = 0.95
    """``--compression topk`` only: β in e ← β·e + Δ (the error-feedback buffer's decay per round; 1 =
    nothing unsent is ever forgotten). With β < 1 the buffer is the momentum (SparseLoCo): a coordinate
    that keeps getting the same push accumulates up to 1/(1−β) rounds of it before it is sent. Measured
    on ``debug`` (``benchmarks/sparse.py``): β = 1 with Nesterov 0.9 overshoots (held-out loss rises for
    rounds 2–5, +12 % after 12 rounds); 0.95 without outer momentum does not."""

    topk_outer_momentum: float | None = 0.0
    """``--compression topk`` only: the outer Nesterov momentum used instead of ``outer_momentum`` (None:
    ``outer_momentum``). SparseLoCo drops outer momentum: the error-feedback buffer already carries
    what was not applied yet, and momentum on top of it re-applies late mass (symptom: held-out loss
    jumps up for a few rounds after the first ones). See ``benchmarks/sparse.py``."""
    topk_outer_lr: float | None = 1.0
    """``--compression topk`` only: the outer learning rate used instead of ``outer_lr`` (None:
    ``outer_lr``). A round applies lr × the combined Δ̂s once (``topk_aggregation``; no momentum: the
    error-feedback buffer is it). Measured on ``debug`` with ``support`` (``benchmarks/sparse.py``,
    RESULTS "Sparse Δs: an outer step that does not depend on the group size"): 1.0 fell steadily at 2
    and 4 peers, at 50, 110 and 200 inner steps a round, in simulation and in real 4-peer swarms; 2.0
    jumped up in round 2. Lower it if held-out loss jumps up after a round; raise it (≤ 1.5) if loss
    falls steadily but slower than with 8-bit."""
    topk_aggregation: Literal["support", "mean"] = "support"
    """``--compression topk`` only: how a part owner combines the senders' sparse Δ̂s
    (:func:`peer.training.robust.weighted_mean`). ``support`` (SparseLoCo, Templar): each coordinate
    averaged over the senders that sent it, so a round moves a coordinate by its senders' mean value
    whatever the group size. ``mean``: over every sender, so a value only one of n peers kept is
    applied ÷ n and the right ``topk_outer_lr`` depends on n (2.0, tuned at 4 peers, jumped at 2).
    Only part owners use it; their averages reach everyone as bytes, so a swarm stays bit-identical
    either way, but peers of one swarm should agree on it."""

    def outer_settings(self, sparse: bool = False) -> tuple[float, float]:
        """(lr, momentum) of the outer step in this round mode: ``outer_lr`` / ``outer_momentum``, replaced by
        the ``overlapped_outer_*`` values in overlapped rounds and then by the ``topk_outer_*`` values for
        sparse Δs (each None: not replaced)."""
        lr, mu = self.outer_lr, self.outer_momentum
        overrides = (
            [(self.overlapped_outer_lr, self.overlapped_outer_momentum)]
            if self.rounds == "overlapped"
            else []
        )
        if sparse:
            overrides.append((self.topk_outer_lr, self.topk_outer_momentum))
        for o_lr, o_mu in overrides:
            lr = lr if o_lr is None else o_lr
            mu = mu if o_mu is None else o_mu
        return lr, mu

    @property
    def topk_k(self) -> int:
        """Values kept per top-k chunk."""
        return max(1, min(self.topk_chunk, round(self.topk_density * self.topk_chunk)))

    def __post_init__(self) -> None:
        if not 0 < self.topk_density <= 1:
            raise ConfigError(f"train.topk_density must be in (0, 1], got {self.topk_density}")
        if not 1 <= self.topk_chunk <= 32768:
            raise ConfigError(f"train.topk_chunk must be in [1, 32768], got {self.topk_chunk}")
        if self.topk_outer_lr is not None and not self.topk_outer_lr > 0:
            raise ConfigError(f"train.topk_outer_lr must be > 0, got {self.topk_outer_lr}")
        if self.topk_outer_momentum is not None and not 0 <= self.topk_outer_momentum < 1:
            raise ConfigError("train.topk_outer_momentum must be in [0, 1)")
        if self.overlapped_outer_lr is not None and not self.overlapped_outer_lr > 0:
            raise ConfigError(f"train.overlapped_outer_lr must be > 0, got {self.overlapped_outer_lr}")
        if self.overlapped_outer_momentum is not None and not 0 <= self.overlapped_outer_momentum < 1:
            raise ConfigError("train.overlapped_outer_momentum must be in [0, 1)")
        if self.topk_aggregation not in ("support", "mean"):
            raise ConfigError(
                f"train.topk_aggregation must be support or mean, got {self.topk_aggregation!r}"
            )
        if not 0 < self.topk_ef_decay <= 1:
            raise ConfigError(f"train.topk_ef_decay must be in (0, 1], got {self.topk_ef_decay}")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size must be >= 1")
        for name in ("inner_lr", "outer_lr", "round_seconds", "averaging_timeout", "max_delta_norm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError("train.outer_momentum must be in [0, 1)")
        if self.averaging_reserve_seconds >= self.round_seconds:
            raise ConfigError("train.averaging_reserve_seconds must be shorter than train.round_seconds")
        if self.max_inner_steps < 1:
            raise ConfigError("train.max_inner_steps must be >= 1")
        if self.rounds not in ("overlapped", "blocking"):
            raise ConfigError(f"train.rounds must be overlapped or blocking, got {self.rounds!r}")
        if self.overlapped_start not in ("own", "shared"):
            raise ConfigError(f"train.overlapped_start must be own or shared, got {self.overlapped_start!r}")


@dataclass(kw_only=True)
class RunConfig:
    """A model config file: what every peer and validator of one swarm must agree on."""

    name: str
    """Config name (file stem), e.g. ``debug``."""
    model: ModelConfig
    data: DataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        if self.model.max_position_embeddings < self.data.seq_len:
            raise ConfigError("model.max_position_embeddings must be >= data.seq_len")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    hints = get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if hint is float and isinstance(value, int | str) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}.{key}: expected a number, got {value!r}") from None
        values[key] = value
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_run_config(name_or_path: str) -> RunConfig:
    """Load ``model_configs/<name>.yaml`` (or a path to a YAML file) into a validated RunConfig."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        shipped = ", ".join(available_configs())
        raise ConfigError(f"model config {name_or_path!r} not found (looked at {path}); shipped: {shipped}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections model/data/train")
    missing = {"model", "data"} - set(raw)
    if missing:
        raise ConfigError(f"{path}: missing section(s) {sorted(missing)}")
    extra = set(raw) - {"model", "data", "train"}
    if extra:
        raise ConfigError(f"{path}: unknown section(s) {sorted(extra)}; expected model, data, train")
    return RunConfig(
        name=path.stem,
        model=_build(ModelConfig, raw["model"], f"{path.name}:model"),
        data=_build(DataConfig, raw["data"], f"{path.name}:data"),
        train=_build(TrainConfig, raw.get("train") or {}, f"{path.name}:train"),
    )


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def override(cfg: Any, **changes: Any) -> Any:
    """A copy of a config dataclass with some fields changed (validated again)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


AveragingMode = Literal["diloco", "sync"]
