"""The ``Chain`` protocol, its typed results and its typed errors.

Two implementations satisfy it and are tested by one contract suite (``tests/test_chain_contract.py``):

* :class:`peer.chain.local.LocalLedger` — the embedded default: one SQLite file shared by every local
  process, following the runtime's rules for what gradswarm uses.
* :class:`peer.chain.substrate.SubstrateChain` — substrate-interface against a real subtensor (finney,
  test, a local subtensor, or Chopsticks running the real runtime).

Amounts are integers in rao (1 TAO = 10**9 rao). Weights are u16. Hashes are ``0x`` + hex strings.
Every write takes the signer's ``Keypair`` (sr25519): the write is signed and the signature is checked
by the chain (the runtime) or the ledger (LocalLedger) — an address alone never authorises anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from substrateinterface import Keypair

from peer.errors import NetworkError, UserError

RAO_PER_TAO = 10**9


# ---------------------------------------------------------------------------------------------- errors
class ChainError(UserError):
    """A chain or ledger call was refused; the message names the rule and how to fix it."""


class ChainUnreachable(ChainError, NetworkError):
    """The chain endpoint (or the ledger file) cannot be reached or opened."""


class UnknownNetwork(ChainError):
    """``--subtensor.network`` names no known network."""


class SubnetNotFound(ChainError):
    """The netuid does not exist on this chain/ledger."""


class NotRegistered(ChainError):
    """The hotkey has no uid on this subnet (register it first: ``peer chain register``)."""


class RegistrationError(ChainError):
    """Registration refused: subnet full of immune neurons, too many registrations, ..."""


class BurnRequired(ChainError):
    """Registration costs a burn; it is spent only when the caller passes an explicit flag."""


class InsufficientBalance(ChainError):
    """The coldkey's free balance does not cover the amount (stake, burn)."""


class RateLimited(ChainError):
    """Too soon since the last call of this kind (weights, commits, commitments)."""


class WeightsError(ChainError):
    """The weights vector is invalid: lengths, duplicates, unknown uids, version key, permit."""


class CommitRevealError(ChainError):
    """set_weights while commit-reveal is on, or commit/reveal while it is off."""


class RevealTooEarly(CommitRevealError):
    """The reveal came before the commit's reveal window opened; wait for ``first_reveal_block``."""


class RevealTooLate(CommitRevealError):
    """The commit expired (its reveal window has passed) or no commit matches the revealed values."""


class BadSignature(ChainError):
    """A ledger extrinsic whose signature, signer, era or replay check failed."""


class PermissionDenied(ChainError):
    """The signer is not allowed to do this (not the subnet owner, not sudo, ...)."""


class ExtrinsicFailed(ChainError):
    """A runtime error without a more specific class; the message carries the runtime's error name."""


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Neuron:
    """One uid on a subnet, as the metagraph shows it."""

    uid: int
    hotkey: str
    coldkey: str
    stake: int
    """Stake in rao behind the hotkey: alpha on this subnet + root (netuid 0) stake on a real chain."""
    validator_permit: bool
    last_update: int
    """Block of the last weights (or registration) of this uid."""
    registered_at: int
    incentive: float
    """Share of the miner emission in the last epoch, 0..1 (sums to 1 over the subnet)."""
    dividends: float
    """Share of the validator emission in the last epoch, 0..1."""
    consensus: float
    """Stake-weighted consensus weight of this uid in the last epoch, 0..1."""
    emission: int
    """Rao earned in the last epoch."""

    @property
    def stake_tao(self) -> float:
        return self.stake / RAO_PER_TAO


@dataclass(frozen=True)
class Metagraph:
    """Every neuron of a subnet at one block."""

    netuid: int
    block: int
    neurons: tuple[Neuron, ...]

    @property
    def n(self) -> int:
        return len(self.neurons)

    def by_hotkey(self) -> dict[str, Neuron]:
        return {nr.hotkey: nr for nr in self.neurons}

    def uid_of(self, hotkey: str) -> int | None:
        nr = self.by_hotkey().get(hotkey)
        return None if nr is None else nr.uid


@dataclass(frozen=True)
class Hyperparameters:
    """The subnet parameters gradswarm depends on (names as in the runtime's storage)."""

    tempo: int
    """Blocks per epoch minus one: an epoch runs every ``tempo + 1`` blocks."""
    weights_rate_limit: int
    """Blocks a uid must wait between two set_weights (or commits)."""
    commit_reveal_enabled: bool
    """Weights must go through commit_weights + reveal_weights."""
    reveal_period_epochs: int
    """A commit is revealed this many epochs after the epoch it was committed in."""
    max_uids: int
    """Subnet size; a registration into a full subnet replaces the non-immune uid that earned least."""
    immunity_period: int
    """Blocks after registration during which a uid cannot be replaced."""
    min_allowed_weights: int
    max_weights_limit: int
    weights_version_key: int
    """Weights with a smaller version key are refused."""
    max_validators: int
    """How many uids (top stake) hold a validator permit."""
    burn: int
    """Registration cost in rao (burned_register)."""
    commitment_rate_limit: int
    """Blocks between two commitments of one hotkey."""


@dataclass(frozen=True)
class TxResult:
    """A write that succeeded: the block it landed in."""

    call: str
    block: int


@dataclass(frozen=True)
class Registration:
    """A hotkey's uid on a subnet."""

    netuid: int
    uid: int
    hotkey: str
    coldkey: str
    block: int
    new: bool
    """False when the hotkey already held this uid (nothing was spent)."""


@dataclass(frozen=True)
class WeightCommit:
    """A pending weight commit: reveal it in ``[first_reveal_block, last_reveal_block]``."""

    hash: str
    commit_block: int
    first_reveal_block: int
    last_reveal_block: int


@dataclass(frozen=True)
class SubnetParams:
    """Parameters for a new subnet (local runs and test chains). None = the chain's default."""

    tempo: int | None = None
    weights_rate_limit: int | None = None
    commit_reveal_enabled: bool | None = None
    reveal_period_epochs: int | None = None
    max_uids: int | None = None
    immunity_period: int | None = None
    burn: int | None = None
    extra: dict = field(default_factory=dict)


# -------------------------------------------------------------------------------------------- protocol
@runtime_checkable
class Chain(Protocol):
    """What peers and validators need from a chain. Both implementations pass the same contract tests."""

    block_time: float
    """Expected seconds per block (estimates round end times)."""

    def block(self) -> int:
        """Current block height."""
        ...

    def block_hash(self, n: int) -> str:
        """Hash of block ``n`` (``0x`` + hex); raises ChainError if ``n`` is in the future."""
        ...

    def metagraph(self, netuid: int) -> Metagraph: ...

    def uid_of(self, netuid: int, hotkey: str) -> int | None: ...

    def hyperparameters(self, netuid: int) -> Hyperparameters: ...

    def register(
        self, netuid: int, hotkey: Keypair, coldkey: Keypair | None = None, *, burn: bool = False
    ) -> Registration:
        """Give ``hotkey`` a uid (idempotent). Spends a burn only with ``burn=True``."""
        ...

    def set_commitment(self, netuid: int, hotkey: Keypair, data: bytes) -> TxResult: ...

    def commitments(self, netuid: int) -> dict[str, bytes]:
        """hotkey ss58 -> committed bytes."""
        ...

    def set_weights(
        self, netuid: int, hotkey: Keypair, uids: Sequence[int], weights: Sequence[int], version_key: int
    ) -> TxResult: ...

    def commit_weights(
        self,
        netuid: int,
        hotkey: Keypair,
        uids: Sequence[int],
        weights: Sequence[int],
        salt: Sequence[int],
        version_key: int,
    ) -> WeightCommit:
        """Commit the runtime hash of these weights; reveal them later with the same arguments."""
        ...

    def reveal_weights(
        self,
        netuid: int,
        hotkey: Keypair,
        uids: Sequence[int],
        weights: Sequence[int],
        salt: Sequence[int],
        version_key: int,
    ) -> TxResult: ...

    def pending_commits(self, netuid: int, hotkey: str) -> list[WeightCommit]: ...

    def weights(self, netuid: int) -> dict[int, list[tuple[int, int]]]:
        """setter uid -> [(dest uid, u16 weight)] as stored (max-upscaled)."""
        ...

    def add_stake(self, netuid: int, hotkey: str, coldkey: Keypair, amount: int) -> TxResult: ...

    def balance(self, address: str) -> int:
        """Free balance of ``address`` in rao."""
        ...

    def close(self) -> None: ...


def check_weights_shape(uids: Sequence[int], weights: Sequence[int]) -> tuple[list[int], list[int]]:
    """Plain validation both implementations share: equal lengths, no duplicates, u16 values."""
    u, w = [int(x) for x in uids], [int(x) for x in weights]
    if len(u) != len(w):
        raise WeightsError(f"{len(u)} uids but {len(w)} weights: pass one weight per uid")
    if len(set(u)) != len(u):
        raise WeightsError("duplicate uids in the weights: each uid may appear once")
    for x in w:
        if not 0 <= x <= 65535:
            raise WeightsError(f"weight {x} is not a u16 (0..65535): normalise before setting")
    for x in u:
        if not 0 <= x <= 65535:
            raise WeightsError(f"uid {x} is not a u16")
    return u, w


def ensure_commitment(chain: Chain, netuid: int, hotkey: Keypair, data: bytes) -> bool:
    """Commit ``data`` unless the chain already holds exactly it for this hotkey; True if it sent one.

    A restarted peer re-announcing the same address must not trip the commitment rate limit
    (100 blocks on the runtime, ``commitment_rate_limit`` on LocalLedger)."""
    if chain.commitments(netuid).get(hotkey.ss58_address) == bytes(data):
        return False
    chain.set_commitment(netuid, hotkey, data)
    return True
